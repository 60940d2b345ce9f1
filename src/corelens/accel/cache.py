"""The KV caches of accelerated decoding: ``HybridCache`` (full KV heads keep everything,
streaming KV heads keep sinks, text, summaries and a window), ``FastVCache`` (pruned tokens are
never stored) and ``cache_nbytes`` for any of them or an HF cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from corelens.accel.decoding import alive_index, gather_heads, neg_inf
from corelens.core.attention import KernelCall
from corelens.errors import InputError


@dataclass
class Slots:
    """What the entries of a hybrid cache hold, for the layers of one sliding window (or the
    full-attention layers): full-KV-head entries ``f_*`` and streaming-KV-head entries ``s_*``,
    each with its original sequence index (a summary: its chunk's last token) and its kind for
    a streaming query head: 0 kept for good (sink, text), 1 window-only (seen while
    ``pos >= i - window``), 2 summary (a full head never sees it)."""

    f_pos: Int[Tensor, "batch n"]
    f_kind: Int[Tensor, "batch n"]
    f_ok: Bool[Tensor, "batch n"]  # key valid (not padding)
    f_bias: Float[Tensor, "batch n"]  # score bias for a streaming query head (log chunk size)
    s_pos: Int[Tensor, "batch m"]
    s_kind: Int[Tensor, "batch m"]
    s_ok: Bool[Tensor, "batch m"]
    s_bias: Float[Tensor, "batch m"]

    FIELDS = ("f_pos", "f_kind", "f_ok", "f_bias", "s_pos", "s_kind", "s_ok", "s_bias")

    def repeat(self, n: int) -> "Slots":
        return Slots(*(getattr(self, f).repeat_interleave(n, 0) for f in self.FIELDS))

    def append(self, i: int) -> None:
        """One new (text) token at sequence index ``i``: every head keeps it."""
        b, dev = self.f_ok.shape[0], self.f_ok.device
        new = {"pos": torch.full((b, 1), i, dtype=torch.long, device=dev),
               "kind": torch.zeros(b, 1, dtype=torch.long, device=dev),
               "ok": torch.ones(b, 1, dtype=torch.bool, device=dev),
               "bias": torch.zeros(b, 1, device=dev)}
        for side in "fs":
            for f, x in new.items():
                setattr(self, f"{side}_{f}", torch.cat([getattr(self, f"{side}_{f}"), x], 1))

    def keep(self, side: str, idx: Int[Tensor, "batch k"]) -> None:
        """Keep entries ``idx`` of side ``"f"`` or ``"s"``."""
        for f in ("pos", "kind", "ok", "bias"):
            setattr(self, f"{side}_{f}", getattr(self, f"{side}_{f}").gather(1, idx))

    def streaming_sees(self, side: str, i: int, window: int) -> Bool[Tensor, "batch n"]:
        """Which entries of side ``side`` a streaming query head at index ``i`` sees (before
        the layer's sliding window)."""
        pos, kind, ok = (getattr(self, f"{side}_{f}") for f in ("pos", "kind", "ok"))
        return ok & ((kind != 1) | (pos >= i - window))


class HybridCache:
    """The hybrid KV cache: full KV heads keep every token; streaming KV heads keep sinks,
    text, pooled summaries and the last ``window`` prompt tokens (masked out as they leave the
    window). Generated tokens are text: every head keeps them. On a sliding-window layer
    (Gemma 3) only the entries the next query can still see are held — original sequence index
    ``> i - sliding_window`` (and, for window-only entries, inside the hybrid window): the
    others are freed before each step (and after prefill), so such a layer holds at most
    ``sliding_window`` entries per head kind. ``slots[w]`` describes the entries of the layers
    with sliding window ``w`` (``None``: full-attention layers)."""

    def __init__(self, n_layers: int, window: int,
                 sliding: Sequence[int | None] | None = None) -> None:
        self.window = window
        self.sliding = list(sliding) if sliding is not None else [None] * n_layers
        self.kf: list[Tensor | None] = [None] * n_layers
        self.vf: list[Tensor | None] = [None] * n_layers
        self.ks: list[Tensor | None] = [None] * n_layers
        self.vs: list[Tensor | None] = [None] * n_layers
        self.slots: dict[int | None, Slots] = {}
        self.length = 0  # sequence length so far (the next token's index)
        self.masks: dict[int | None, StepMasks] = {}  # per sliding window: this step's masks
        self._group_masks: dict[tuple, Tensor] = {}
        self.mrope = False  # the model takes [3, batch, 1] step positions (M-RoPE)

    def _used(self, name: str, layer: int) -> int:
        sl = self.slots[self.sliding[layer]]
        return (sl.f_pos if name in ("kf", "vf") else sl.s_pos).shape[1]

    def nbytes(self, layers: Sequence[int] | None = None) -> int:
        """Bytes of the keys / values held (entries in use, not capacity ``reserve``d), of
        ``layers`` (default: all)."""
        layers = range(len(self.kf)) if layers is None else layers
        return sum(t[:, :, :self._used(name, l)].numel() * t.element_size()
                   for name in ("kf", "vf", "ks", "vs") for l in layers
                   if (t := getattr(self, name)[l]) is not None)

    def reserve(self, n: int) -> None:
        """Room for ``n`` more tokens in every full-attention layer, so that decoding steps
        write in place (no per-step copy of the whole cache, as a preallocated / static cache).
        Sliding-window layers are rewritten, at most ``sliding_window`` entries, each step."""
        for name in ("kf", "vf", "ks", "vs"):
            ts = getattr(self, name)
            for l, x in enumerate(ts):
                u = self._used(name, l)
                if x is not None and self.sliding[l] is None and x.shape[2] < u + n:
                    buf = x.new_empty(*x.shape[:2], u + n, x.shape[3])
                    buf[:, :, :u] = x[:, :, :u]
                    ts[l] = buf

    def _append(self, name: str, layer: int, x: Tensor, n: int) -> Tensor:
        """Write the step's ``x`` as entry ``n - 1`` of ``name[layer]``; the first ``n``."""
        ts = getattr(self, name)
        buf = ts[layer]
        if buf.shape[2] >= n:
            buf[:, :, n - 1:n] = x
            return buf[:, :, :n]
        ts[layer] = torch.cat([buf[:, :, :n - 1], x], 2)
        return ts[layer]

    def repeat(self, n: int) -> "HybridCache":
        """Each example repeated ``n`` times (``repeat_interleave`` over the batch)."""
        out = HybridCache(len(self.kf), self.window, self.sliding)
        for name in ("kf", "vf", "ks", "vs"):
            setattr(out, name, [None if t is None else t.repeat_interleave(n, 0)
                                for t in getattr(self, name)])
        out.slots = {sw: sl.repeat(n) for sw, sl in self.slots.items()}
        out.length, out.mrope = self.length, self.mrope
        return out

    def trim(self) -> None:
        """Free the entries of sliding-window layers that the next token (index ``length``)
        and all later ones can no longer see (one slot-compacting copy per layer, at most
        ``sliding_window`` entries)."""
        i = self.length
        for sw, sl in self.slots.items():
            if sw is None:
                continue
            layers = [l for l, w in enumerate(self.sliding) if w == sw]
            f_idx = alive_index(sl.f_ok & (sl.f_pos > i - sw))
            if f_idx.shape[1] < sl.f_pos.shape[1]:
                sl.keep("f", f_idx)
                self._compact(("kf", "vf"), layers, f_idx)
            s_alive = sl.s_ok & (sl.s_pos > i - sw) & ((sl.s_kind != 1)
                                                        | (sl.s_pos >= i - self.window))
            s_idx = alive_index(s_alive)
            if s_idx.shape[1] < sl.s_pos.shape[1]:
                sl.keep("s", s_idx)
                self._compact(("ks", "vs"), layers, s_idx)

    def _compact(self, names: tuple[str, str], layers: list[int], idx: Tensor) -> None:
        """Keep entries ``idx`` of ``names`` in ``layers``, with room for one more."""
        for name in names:
            ts = getattr(self, name)
            for l in layers:
                x = ts[l]
                if x is None:
                    continue
                buf = x.new_empty(*x.shape[:2], idx.shape[1] + 1, x.shape[3])
                buf[:, :, :idx.shape[1]] = gather_heads(x, idx)
                ts[l] = buf

    def begin_step(self, dtype: torch.dtype) -> None:
        """Free what the new token cannot see, register it (a text token) for every example,
        and build this step's masks."""
        self.trim()
        i = self.length
        for sl in self.slots.values():
            sl.append(i)
        self.length += 1
        neg = neg_inf(dtype)
        self.masks, self._group_masks = {}, {}

        def additive(seen: Tensor, bias: Tensor | float = 0.0) -> Tensor:
            return torch.where(seen, bias, neg).to(dtype)[:, None, None, :]

        for sw, sl in self.slots.items():  # a sliding layer sees keys j > i - sliding_window
            full = sl.f_ok & (sl.f_kind != 2)
            full_stream = sl.streaming_sees("f", i, self.window)
            stream = sl.streaming_sees("s", i, self.window)
            if sw is not None:
                full = full & (sl.f_pos > i - sw)
                full_stream = full_stream & (sl.f_pos > i - sw)
                stream = stream & (sl.s_pos > i - sw)
            self.masks[sw] = StepMasks(additive(full), additive(full_stream, sl.f_bias),
                                       additive(stream, sl.s_bias))

    def group_mask(self, sliding: int | None,
                   row_full: Bool[Tensor, "groups rep"]) -> Float[Tensor, "batch groups rep n"]:
        """This step's additive mask over the full cache for the query heads of full KV groups
        folded into rows (group g, row r = query head ``g * rep + r``): the full mask on the
        rows of full query heads, the streaming one on the others. Built once per step and
        pattern."""
        m = self.masks[sliding]
        if bool(row_full.all()):
            return m.full
        key = (sliding, tuple(row_full.flatten().tolist()), row_full.shape)
        if key not in self._group_masks:
            rows = row_full.to(m.full.device)[None, :, :, None]
            self._group_masks[key] = torch.where(rows, m.full, m.full_stream)
        return self._group_masks[key]


@dataclass
class StepMasks:
    """A decoding step's additive masks ``[batch, 1, 1, n]`` for one sliding window: over the
    full cache for full query heads (``full``) and for streaming query heads of full groups
    (``full_stream``), over the streaming cache (``stream``)."""

    full: Tensor
    full_stream: Tensor
    stream: Tensor


class FastVCache:
    """FastV's KV cache: per layer the keys / values of the tokens it computed (layers >= k:
    the kept ones) and of the generated tokens, each with its original sequence index
    (``pos``) and validity (``ok``: not padding). Sliding-window layers keep only the keys
    that the next query (index ``length``) can still see, ``pos > length - sliding_window``:
    the window is applied by original position, not by slot."""

    def __init__(self, sliding: list[int | None]) -> None:
        n = len(sliding)
        self.sliding = sliding
        self.k: list[Tensor | None] = [None] * n
        self.v: list[Tensor | None] = [None] * n
        self.pos: list[Tensor] = [torch.empty(0)] * n  # [b, n_l] sequence index
        self.ok: list[Tensor] = [torch.empty(0)] * n  # [b, n_l] key valid
        self.length = 0  # the next token's sequence index

    def nbytes(self, layers: Any = None) -> int:
        """Bytes of the keys / values held (of ``layers``, default all)."""
        layers = range(len(self.k)) if layers is None else layers
        return sum(t.numel() * t.element_size() for l in layers for t in (self.k[l], self.v[l]))

    def trim(self) -> None:
        """Free the entries of sliding-window layers that the next query no longer sees."""
        for l, sw in enumerate(self.sliding):
            if sw is None:
                continue
            idx = alive_index(self.pos[l] > self.length - sw)
            if idx.shape[1] < self.pos[l].shape[1]:
                self.k[l], self.v[l] = (gather_heads(x, idx) for x in (self.k[l], self.v[l]))
                self.pos[l], self.ok[l] = self.pos[l].gather(1, idx), self.ok[l].gather(1, idx)

    def attend(self, call: KernelCall) -> Tensor:
        """The decoding kernel: append the step's key / value, attend over the layer's cache."""
        l, q = call.layer, call.q
        if q.shape[2] != 1:
            raise InputError("FastV cached decoding runs one token per step")
        b = q.shape[0]
        i = self.length
        self.k[l] = torch.cat([self.k[l], call.k], 2)
        self.v[l] = torch.cat([self.v[l], call.v], 2)
        self.pos[l] = torch.cat([self.pos[l], torch.full((b, 1), i, device=q.device)], 1)
        self.ok[l] = torch.cat([self.ok[l], torch.ones(b, 1, dtype=torch.bool,
                                                        device=q.device)], 1)
        seen = self.ok[l]
        if self.sliding[l] is not None:
            seen = seen & (self.pos[l] > i - self.sliding[l])
        mask = torch.where(seen, 0.0, neg_inf(q.dtype)).to(q.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(q, self.k[l], self.v[l], attn_mask=mask,
                                              scale=call.scaling,
                                              enable_gqa=q.shape[1] != call.k.shape[1])


def cache_nbytes(cache: Any) -> int:
    """Bytes held by an HF cache (``DynamicCache``), a ``HybridCache`` or a ``FastVCache``."""
    if isinstance(cache, (HybridCache, FastVCache)):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
