"""What a ``run_with_cache`` will hold, before it runs: bytes per hook point from the model's
widths, against the memory the device has free.

At real length the cache is dominated by two kinds of hook: the attention scores and patterns
(``[batch, head, query, key]``: quadratic in the sequence; Qwen2.5-VL-7B at 4,871 tokens holds
1.3 GB per layer for the two) and the logits (``[batch, pos, vocab]``; a 152k vocabulary at
4,871 tokens is 1.5 GB in bf16). The estimate covers every decoder hook point the filter picks
(each hook point once, however many names reach it); vision-tower hooks are batched by image
and left out (``VisionHooksNotCounted`` in the breakdown).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from corelens.hook_names import is_vision_hook


class CacheMemoryWarning(UserWarning):
    """The requested cache would take over half the free memory."""


WARN_FRACTION = 0.5  # warn above this share of free memory; refuse above all of it

# last-axis width of a hook point, by the end of its name (checked in this order)
_WIDTHS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("hook_scale",), "one"),
    (("hook_q", "hook_rot_q", "hook_z", "hook_result", "attn.q.hook_out", "attn.o.hook_in",
      "hook_q_normed"), "q_heads"),
    (("hook_k", "hook_v", "hook_rot_k", "attn.k.hook_out", "attn.v.hook_out", "hook_k_normed"),
     "kv_heads"),
    (("hook_cos", "hook_sin"), "rotary"),
    (("hook_pre", "hook_post", "hook_pre_linear", "gate.hook_out", "mlp.in.hook_out",
      "mlp.out.hook_in"), "d_mlp"),
    (("unembed.hook_out", "hook_unembed"), "vocab"),
)


def _width(name: str, cfg: Any) -> int:
    heads, kv = int(cfg.n_heads), int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    d_head = int(cfg.d_head)
    for norm, n in ((".q_norm.", heads), (".k_norm.", kv)):  # per-head norms (Qwen3, Gemma 3)
        if norm in name:
            return n if name.endswith("hook_scale") else n * d_head
    for ends, kind in _WIDTHS:
        if name.endswith(ends):
            return {"one": 1, "q_heads": heads * d_head, "kv_heads": kv * d_head,
                    "rotary": int(getattr(cfg, "rotary_dim", None) or d_head),
                    "d_mlp": int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model),
                    "vocab": int(cfg.d_vocab)}[kind]
    return int(cfg.d_model)


def estimate(model: Any, names: Sequence[str], batch: int, seq: int, rows: int | None = None,
             logits_rows: int | None = None,
             hooks: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes of each picked decoder hook point (first name per hook point) for a forward of
    ``batch`` x ``seq`` tokens; ``rows``: positions kept per example (``positions=``; patterns
    keep those query rows), ``logits_rows``: positions the unembedding runs on."""
    cfg, size = model.cfg, _element_size(model)
    heads = int(cfg.n_heads)
    out: dict[str, int] = {}
    seen: set[int] = set()
    hooks = model.hook_dict if hooks is None else hooks
    for name in names:
        point = hooks.get(name)
        if point is None or id(point) in seen or is_vision_hook(name):
            continue
        seen.add(id(point))
        kept = seq if rows is None else rows
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            out[name] = batch * heads * kept * seq * size
        elif name == "embed.hook_in":
            out[name] = batch * seq * 8  # token ids
        else:
            if name.endswith(("unembed.hook_out", "hook_unembed")) and logits_rows is not None:
                kept = min(kept, logits_rows)
            out[name] = batch * kept * _width(name, cfg) * size
    return out


def _element_size(model: Any) -> int:
    try:
        return next(model.hf_model.parameters()).element_size()
    except (StopIteration, AttributeError):
        return 4


def free_bytes(device: torch.device) -> int | None:
    """Free memory where the cache will live: the GPU's (``mem_get_info``) or the host's
    (``MemAvailable``); ``None`` when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def kind_of(name: str) -> str:
    """The group a hook point's bytes are reported under."""
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return "attention patterns"
    if name.startswith(("unembed", "hook_unembed")):
        return "logits"
    if ".attn." in name:
        return "attention q/k/v/z"
    if ".mlp." in name or name.endswith(("hook_pre", "hook_post")):
        return "MLP"
    return "residual stream and norms"


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"


def advice(parts: dict[str, int], total: int, free: int, positions: bool) -> str:
    """The message: the estimate, its largest parts by kind, and the cheaper paths."""
    kinds: dict[str, int] = {}
    for name, n in parts.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0) + n
    top = sorted(kinds.items(), key=lambda kv: -kv[1])
    fixes = ["names_filter= only the hooks you read (e.g. lambda n: n.endswith('hook_z'))"]
    if "attention patterns" in kinds:
        fixes.append("drop hook_attn_scores (the pattern is its softmax) or both")
    if not positions:
        fixes.append('positions="query" (or "vision", or your positions): patterns keep '
                     "those query rows only")
    fixes.append("a smaller batch; corelens.scores.ram.score_all reduces patterns on the fly "
                 "without caching them")
    return (f"run_with_cache would hold about {gib(total)} ("
            + ", ".join(f"{k} {gib(v)}" for k, v in top)
            + f") with {gib(free)} free. Cheaper: " + "; ".join(fixes)
            + ". check_memory=False skips this check.")
