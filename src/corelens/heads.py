"""Attention heads as corelens names them: one definition for the whole package.

A query head is ``(layer, head)``, labelled ``L{layer}H{head}``; under GQA a key/value head is
``(layer, kv_head)``, labelled ``L{layer}KV{kv_head}``.
"""

from __future__ import annotations

Head = tuple[int, int]  # (layer, query head) -- or (layer, kv head) where a KV head is meant


def head_name(head: Head) -> str:
    """``(4, 2)`` -> ``"L4H2"``."""
    return f"L{head[0]}H{head[1]}"


def kv_head_name(head: Head) -> str:
    """A key/value head: ``(4, 1)`` -> ``"L4KV1"``."""
    return f"L{head[0]}KV{head[1]}"


def parse_head(name: str) -> Head:
    """The inverse of ``head_name`` and ``kv_head_name``: ``"L4H2"`` -> ``(4, 2)``."""
    body = name[1:].replace("KV", "H") if name.startswith("L") else ""
    layer, sep, head = body.partition("H")
    if not (sep and layer.isdigit() and head.isdigit()):
        raise ValueError(f"not a head label: {name!r} (expected like 'L4H2' or 'L4KV1')")
    return int(layer), int(head)


__all__ = ["Head", "head_name", "kv_head_name", "parse_head"]
