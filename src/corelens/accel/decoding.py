"""What hybrid attention and FastV both need to run a model: the family check, the decoder's
sliding windows, position ids of generated tokens, and the cache compaction primitives."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from corelens.errors import InputError
from corelens.families import FAMILIES


def next_positions(kw: dict[str, Any]) -> tuple[Int[Tensor, " batch"], bool]:
    """The position id of the first token generated after a prompt, per example, and whether
    the model takes M-RoPE ids (``[3, batch, seq]``, the Qwen-VL families).

    1-D RoPE: the last prompt position + 1. M-RoPE: the prompt's largest id (over the three
    rows and the valid tokens) + 1, the same in all three rows, and + 1 per step after it --
    what HF's generation computes as ``text position + rope_deltas`` (``get_rope_index``'s
    ``rope_deltas = max(position) + 1 - n_valid``)."""
    pos = kw.get("position_ids")
    mask = kw["attention_mask"].bool()
    if pos is None:
        return mask.long().sum(-1), False
    if pos.ndim == 3:
        if pos.shape[0] != 3:
            raise InputError(f"cached decoding expects [3, batch, seq] M-RoPE position ids, got "
                             f"{tuple(pos.shape)}")
        return pos.masked_fill(~mask[None], 0).amax(dim=(0, 2)) + 1, True
    if pos.ndim != 2:
        raise InputError(f"cached decoding expects [batch, seq] position ids, got "
                         f"{tuple(pos.shape)}")
    return pos[:, -1] + 1, False


def step_positions(positions: Int[Tensor, " batch"], mrope: bool) -> Tensor:
    """``positions`` as the ``position_ids`` of a one-token step ([b, 1], or [3, b, 1])."""
    p = positions[:, None]
    return p[None].expand(3, -1, -1) if mrope else p


def check_family(model: Any, trait: str, what: str) -> None:
    """Refuse a model whose family does not declare ``trait`` (``Family.supports_*``)."""
    if not getattr(model.family, trait, False):
        supported = sorted(n for n, f in FAMILIES.items() if getattr(f, trait))
        raise InputError(f"corelens.accel: {what} is not supported for the "
                         f"{getattr(model.family, 'name', '?')!r} family (supported: "
                         f"{', '.join(supported)}; a family declares it in its module)")


def text_config(model: Any) -> Any:
    cfg = model.hf_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def sliding_windows(model: Any) -> list[int | None]:
    """Each decoder layer's own sliding window (HF's ``sliding_window``: row i sees keys
    j > i - window), None for a full-attention layer."""
    layers = getattr(getattr(model, "attention", None), "layers", [])
    return [getattr(getattr(a, "original_component", a), "sliding_window", None)
            for a in layers] or [None] * text_config(model).num_hidden_layers


def neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def alive_index(alive: Bool[Tensor, "batch n"]) -> Int[Tensor, "batch m"]:
    """Per example, the indices of its ``alive`` entries in order, padded (with dead ones) to
    the batch's largest count: the compaction that frees a sliding layer's expired keys."""
    n = int(alive.sum(-1).max()) if alive.numel() else 0
    return torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :n]


def gather_heads(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, h, n, d] gathered along n by idx[b, m] -> [b, h, m, d]."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))
