"""CoRe-guided hybrid attention and its KV cache (the variants are defined in
``corelens.accel``'s docstring)."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from corelens.attention import KernelCall, _additive
from corelens.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.families import FAMILIES
from corelens.heads import Head

# the registered families whose traits allow hybrid attention (prefill and cached decoding)
PREFILL_FAMILIES = frozenset(n for n, f in FAMILIES.items() if f.supports_hybrid_attention)
DECODE_FAMILIES = PREFILL_FAMILIES


def _next_positions(kw: dict[str, Any]) -> tuple[Int[Tensor, " batch"], bool]:
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


def _step_positions(positions: Int[Tensor, " batch"], mrope: bool) -> Tensor:
    """``positions`` as the ``position_ids`` of a one-token step ([b, 1], or [3, b, 1])."""
    p = positions[:, None]
    return p[None].expand(3, -1, -1) if mrope else p


def _check_family(model: Any, trait: str, what: str) -> None:
    """Refuse a model whose family does not declare ``trait`` (``Family.supports_*``)."""
    if not getattr(model.family, trait, False):
        supported = sorted(n for n, f in FAMILIES.items() if getattr(f, trait))
        raise InputError(f"corelens.accel: {what} is not supported for the "
                         f"{getattr(model.family, 'name', '?')!r} family (supported: "
                         f"{', '.join(supported)}; a family declares it in its module)")


def _text_config(model: Any) -> Any:
    cfg = model.hf_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _sliding_windows(model: Any) -> list[int | None]:
    """Each decoder layer's own sliding window (HF's ``sliding_window``: row i sees keys
    j > i - window), None for a full-attention layer."""
    layers = getattr(getattr(model, "attention", None), "layers", [])
    return [getattr(getattr(a, "original_component", a), "sliding_window", None)
            for a in layers] or [None] * _text_config(model).num_hidden_layers


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


@dataclass
class _Plan:
    """What streaming heads see for one batch (shared by every layer)."""

    valid: Bool[Tensor, "batch seq"]
    vision: Bool[Tensor, "batch seq"]
    glob: Bool[Tensor, "batch seq"]  # sinks + text
    glob_idx: Int[Tensor, "batch g"]  # sinks + text, padded
    glob_ok: Bool[Tensor, "batch g"]
    pool_w: Tensor  # [batch, p, seq] mean weights
    pool_last: Int[Tensor, "batch p"]
    pool_ok: Bool[Tensor, "batch p"]
    pool_bias: Tensor  # [batch, p] log(chunk size)
    block: Int[Tensor, "batch seq"] | None = None  # image block id (-1: none); None: causal
    _block_mask: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]


def _image_blocks(vision: Bool[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """HF's ``block_sequence_ids`` (Gemma 3): each run of consecutive image tokens is one block
    (0, 1, ... per example), -1 elsewhere."""
    start = vision & ~F.pad(vision, (1, 0))[:, :-1]
    return torch.where(vision, start.long().cumsum(-1) - 1, -1)


def _plan(vision: Tensor, valid: Tensor, n_sink: int, n_pooled: int,
          bidirectional: bool = False) -> _Plan:
    vision, valid = vision.bool() & valid.bool(), valid.bool()
    b, t = valid.shape
    rank = valid.long().cumsum(-1) - 1
    glob = valid & (~vision | (rank < n_sink))
    n_glob = int(glob.sum(-1).max()) if b else 0
    glob_idx = torch.zeros(b, n_glob, dtype=torch.long)
    glob_ok = torch.zeros(b, n_glob, dtype=torch.bool)
    pool_w = torch.zeros(b, n_pooled, t)
    pool_last = torch.zeros(b, n_pooled, dtype=torch.long)
    pool_ok = torch.zeros(b, n_pooled, dtype=torch.bool)
    pool_bias = torch.zeros(b, n_pooled)
    for e in range(b):
        p = glob[e].nonzero()[:, 0].cpu()
        glob_idx[e, :len(p)], glob_ok[e, :len(p)] = p, True
        if n_pooled:
            vp = (vision[e] & ~glob[e]).nonzero()[:, 0].cpu()
            for c, chunk in enumerate(torch.tensor_split(vp, n_pooled)):
                if len(chunk):
                    pool_w[e, c, chunk] = 1.0 / len(chunk)
                    pool_last[e, c], pool_ok[e, c] = chunk[-1], True
                    pool_bias[e, c] = math.log(len(chunk))
    dev = valid.device
    return _Plan(valid, vision, glob, glob_idx.to(dev), glob_ok.to(dev), pool_w.to(dev),
                 pool_last.to(dev), pool_ok.to(dev), pool_bias.to(dev),
                 _image_blocks(vision) if bidirectional else None)


def _layout_masks(batch: MultimodalBatch, device: torch.device) -> tuple[Tensor, Tensor]:
    vision = batch.layout.vision_mask().to(device)
    valid = batch.attention_mask.to(device).bool()
    return vision, valid


def _alive_index(alive: Bool[Tensor, "batch n"]) -> Int[Tensor, "batch m"]:
    """Per example, the indices of its ``alive`` entries in order, padded (with dead ones) to
    the batch's largest count: the compaction that frees a sliding layer's expired keys."""
    n = int(alive.sum(-1).max()) if alive.numel() else 0
    return torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :n]


def _gather_heads(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, h, n, d] gathered along n by idx[b, m] -> [b, h, m, d]."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


@dataclass
class _LayerSplit:
    full_q: Tensor  # query heads attending fully (grouped by KV head)
    full_kv: Tensor
    stream_q: Tensor
    stream_kv: Tensor


@dataclass
class _Slots:
    """What the entries of a hybrid cache hold, for the layers of one sliding window (or the
    full-attention layers): full-head entries ``f_*`` and streaming-head entries ``s_*``, each
    with its original sequence index (a summary: its chunk's last token)."""

    f_pos: Int[Tensor, "batch n"]
    f_ok: Bool[Tensor, "batch n"]  # key valid (not padding)
    s_pos: Int[Tensor, "batch m"]
    s_kind: Int[Tensor, "batch m"]  # 0 kept for good, 1 window-only, 2 summary
    s_ok: Bool[Tensor, "batch m"]
    s_bias: Tensor  # [batch, m] score bias (log chunk size of a summary)

    def repeat(self, n: int) -> "_Slots":
        return _Slots(*(getattr(self, f).repeat_interleave(n, 0) for f in
                        ("f_pos", "f_ok", "s_pos", "s_kind", "s_ok", "s_bias")))

    def append(self, i: int) -> None:
        """One new (text) token at sequence index ``i``: every head keeps it."""
        b, dev = self.f_ok.shape[0], self.f_ok.device
        one = torch.ones(b, 1, dtype=torch.bool, device=dev)
        pos = torch.full((b, 1), i, dtype=torch.long, device=dev)
        self.f_pos, self.f_ok = torch.cat([self.f_pos, pos], 1), torch.cat([self.f_ok, one], 1)
        self.s_pos = torch.cat([self.s_pos, pos], 1)
        self.s_kind = torch.cat([self.s_kind, torch.zeros_like(pos)], 1)
        self.s_ok = torch.cat([self.s_ok, one], 1)
        self.s_bias = torch.cat([self.s_bias, torch.zeros(b, 1, device=dev)], 1)


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
        self.slots: dict[int | None, _Slots] = {}
        self.length = 0  # sequence length so far (the next token's index)
        self.masks: dict[int | None, tuple[Tensor, Tensor]] = {}  # per sliding window:
        # this step's additive (full heads, streaming heads) masks
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
            f_idx = _alive_index(sl.f_ok & (sl.f_pos > i - sw))
            if f_idx.shape[1] < sl.f_pos.shape[1]:
                sl.f_pos, sl.f_ok = sl.f_pos.gather(1, f_idx), sl.f_ok.gather(1, f_idx)
                self._compact(("kf", "vf"), layers, f_idx)
            s_alive = sl.s_ok & (sl.s_pos > i - sw) & ((sl.s_kind != 1)
                                                        | (sl.s_pos >= i - self.window))
            s_idx = _alive_index(s_alive)
            if s_idx.shape[1] < sl.s_pos.shape[1]:
                for f in ("s_pos", "s_kind", "s_ok", "s_bias"):
                    setattr(sl, f, getattr(sl, f).gather(1, s_idx))
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
                buf[:, :, :idx.shape[1]] = _gather_heads(x, idx)
                ts[l] = buf

    def begin_step(self, dtype: torch.dtype) -> None:
        """Free what the new token cannot see, register it (a text token) for every example,
        and build this step's masks."""
        self.trim()
        i = self.length
        for sl in self.slots.values():
            sl.append(i)
        self.length += 1
        neg = _neg(dtype)
        self.masks = {}
        for sw, sl in self.slots.items():  # a sliding layer sees keys j > i - sliding_window
            full = sl.f_ok
            stream = sl.s_ok & ((sl.s_kind != 1) | (sl.s_pos >= i - self.window))
            if sw is not None:
                full = full & (sl.f_pos > i - sw)
                stream = stream & (sl.s_pos > i - sw)
            self.masks[sw] = (torch.where(full, 0.0, neg).to(dtype)[:, None, None, :],
                              torch.where(stream, sl.s_bias, neg).to(dtype)[:, None, None, :])


class HybridAttention:
    """CoRe heads attend fully, the others see sinks + window + text (+ pooled vision).

    Use ``with hybrid.attach(batch): model(batch)`` (or ``attach()`` to plan from every
    ``MultimodalBatch`` the model is called on, e.g. inside ``corelens.evaluate``), and
    ``hybrid.generate(batch, n)`` for greedy decoding with the hybrid KV cache.
    """

    def __init__(self, model: Any, heads: Sequence[Head], n_sink: int = 4, window: int = 64,
                 n_pooled: int = 0) -> None:
        _check_family(model, "supports_hybrid_attention", "hybrid attention")
        if window < 1 or n_sink < 0 or n_pooled < 0:
            raise InputError("hybrid attention wants window >= 1, n_sink >= 0, n_pooled >= 0")
        tc = _text_config(model)
        self.model = model
        self.n_layers = tc.num_hidden_layers
        self.n_heads = tc.num_attention_heads
        self.n_kv = getattr(tc, "num_key_value_heads", None) or self.n_heads
        self.n_rep = self.n_heads // self.n_kv
        self.n_sink, self.window, self.n_pooled = n_sink, window, n_pooled
        # image tokens attending to each other both ways within each image block (HF's
        # ``token_type_ids`` / ``block_sequence_ids``: a run of consecutive image tokens)
        self.bidirectional = model.family.bidirectional_image_blocks
        self.sliding = _sliding_windows(model)
        if n_pooled and (self.bidirectional or any(w is not None for w in self.sliding)):
            raise InputError("pooled summaries (n_pooled > 0) are not defined for models with "
                             "bidirectional image blocks or sliding-window layers; use "
                             "n_pooled=0")
        self.heads = sorted({(int(l), int(h)) for l, h in heads})
        for l, h in self.heads:
            if not (0 <= l < self.n_layers and 0 <= h < self.n_heads):
                raise InputError(f"head L{l}H{h} is outside this model "
                                 f"({self.n_layers} layers x {self.n_heads} heads)")
        full = [set() for _ in range(self.n_layers)]
        for l, h in self.heads:
            full[l].add(h // self.n_rep)
        self.splits: list[_LayerSplit] = []
        for l in range(self.n_layers):
            fkv = sorted(full[l])
            skv = [g for g in range(self.n_kv) if g not in full[l]]
            fq = [g * self.n_rep + r for g in fkv for r in range(self.n_rep)]
            sq = [g * self.n_rep + r for g in skv for r in range(self.n_rep)]
            lt = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
            self.splits.append(_LayerSplit(lt(fq), lt(fkv), lt(sq), lt(skv)))
        self._plan: _Plan | None = None
        self._cache: HybridCache | None = None
        self._building = False

    # --- head sets -------------------------------------------------------------------------
    @property
    def full_kv_heads(self) -> list[Head]:
        """(layer, kv_head) pairs whose KV cache keeps every token."""
        return [(l, int(g)) for l, s in enumerate(self.splits) for g in s.full_kv]

    @property
    def full_heads(self) -> list[Head]:
        """(layer, query head) pairs that attend fully (CoRe heads and their GQA group)."""
        return [(l, int(h)) for l, s in enumerate(self.splits) for h in s.full_q]

    @property
    def kv_budget(self) -> float:
        """Fraction of KV heads kept full."""
        return len(self.full_kv_heads) / (self.n_layers * self.n_kv)

    @classmethod
    def random(cls, model: Any, n_kv_heads: int, seed: int = 0, **kw: Any) -> "HybridAttention":
        """Random KV heads (``n_kv_heads`` of them, e.g. another plan's ``len(full_kv_heads)``)
        kept full: the random-head baseline at the same KV budget."""
        tc = _text_config(model)
        n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        rep = tc.num_attention_heads // n_kv
        pool = [(l, g) for l in range(tc.num_hidden_layers) for g in range(n_kv)]
        chosen = random.Random(seed).sample(pool, n_kv_heads)
        return cls(model, [(l, g * rep) for l, g in chosen], **kw)

    def allowed(self, batch: MultimodalBatch, seq_len: int | None = None) -> list[Tensor]:
        """The per-head key mask equivalent to this hybrid (``n_pooled = 0``): per layer a bool
        [batch, head, seq, seq] for ``model.attention.key_mask``, which intersects it with the
        model's own mask (causal, padding, bidirectional image blocks, sliding windows): the
        streaming heads' sinks + text + the two-sided band ``|i - j| <= window``. ``seq_len`` >
        the batch's extends it with text tokens (generated ones). O(T^2): for tests and small
        inputs."""
        if self.n_pooled:
            raise InputError("pooled summaries are not keys of the sequence: no key mask")
        vision, valid = _layout_masks(batch, torch.device("cpu"))
        t = seq_len or vision.shape[1]
        if t > vision.shape[1]:
            extra = t - vision.shape[1]
            vision = torch.cat([vision, torch.zeros(len(vision), extra, dtype=torch.bool)], 1)
            valid = torch.cat([valid, torch.ones(len(valid), extra, dtype=torch.bool)], 1)
        plan = _plan(vision, valid, self.n_sink, 0)
        glob = plan.glob
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        stream = ((j - i).abs() <= self.window)[None] | glob[:, None, :]  # [b, t, t]
        out = []
        for s in self.splits:
            m = torch.ones(len(valid), self.n_heads, t, t, dtype=torch.bool)
            m[:, s.stream_q] = stream[:, None]
            out.append(m)
        return out

    # --- installation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, batch: MultimodalBatch | None = None) -> Iterator["HybridAttention"]:
        """Run the model's decoder attention as this hybrid within the block. With ``batch``,
        plan for it; without, plan for each ``MultimodalBatch`` the model is called on."""
        handle = None
        if batch is not None:
            self._plan = self._plan_for(batch)
        else:
            def pre(module: Any, args: Any) -> None:
                if args and isinstance(args[0], MultimodalBatch):
                    self._plan = self._plan_for(args[0])

            handle = self.model.register_forward_pre_hook(pre)
        try:
            with self.model.attention.kernel(self._kernel):
                yield self
        finally:
            self._plan = None
            if handle is not None:
                handle.remove()

    def _plan_for(self, batch: MultimodalBatch) -> _Plan:
        return _plan(*_layout_masks(batch, self.model.device), self.n_sink, self.n_pooled,
                     self.bidirectional)

    def _kernel(self, call: KernelCall) -> Tensor | None:
        backend = self.model.attention
        if backend._key_masks.get(call.layer) or backend._taps.get(call.layer):
            raise InputError("hybrid attention does not combine with key_mask / tap on "
                             f"layer {call.layer}")
        split = self.splits[call.layer]
        if self._cache is not None and not self._building:
            return self._decode(call, split)
        plan = self._plan
        if plan is None:
            raise InputError("hybrid attention needs the batch's vision layout: attach(batch), "
                             "or call the model on a MultimodalBatch inside attach()")
        hf_cache = call.hf_cache
        if hf_cache is not None:  # a plain forward with use_cache: fill HF's cache as usual
            if hf_cache.get_seq_length(call.layer) > 0:
                raise InputError("hybrid attention decodes with its own KV cache: use "
                                 "HybridAttention.generate, not model.generate")
            call.update_cache()
        q, k, v = call.q, call.k, call.v
        b, h, t, d = q.shape
        if t != plan.seq_len or k.shape[2] != t:
            raise InputError(f"hybrid attention was planned for {plan.seq_len} tokens, the "
                             f"model was called on {t}")
        z = q.new_empty(b, h, t, d)
        if len(split.full_q):
            kf, vf = k[:, split.full_kv], v[:, split.full_kv]
            mask = _additive(call.mask, q.dtype, t, t)
            zf = F.scaled_dot_product_attention(
                q[:, split.full_q], kf, vf, attn_mask=mask, scale=call.scaling,
                is_causal=mask is None and t > 1, enable_gqa=self.n_rep > 1)
            if len(split.stream_q) == 0:
                z = zf
            else:
                z[:, split.full_q] = zf
        if len(split.stream_q):
            ks, vs = k[:, split.stream_kv], v[:, split.stream_kv]
            z[:, split.stream_q] = self._stream_prefill(q[:, split.stream_q], ks, vs,
                                                        call.scaling, plan,
                                                        self.sliding[call.layer])
        if self._building:
            self._store(call.layer, split, k, v, plan)
        return z

    # --- prefill -----------------------------------------------------------------------------
    def _globals(self, k: Tensor, v: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
        kg, vg = _gather_heads(k, plan.glob_idx), _gather_heads(v, plan.glob_idx)
        if self.n_pooled:
            w = plan.pool_w.to(k.dtype)
            kg = torch.cat([kg, torch.einsum("bpt,bhtd->bhpd", w, k)], 2)
            vg = torch.cat([vg, torch.einsum("bpt,bhtd->bhpd", w, v)], 2)
        return kg, vg

    def _block_mask(self, plan: _Plan, dtype: torch.dtype, device: torch.device,
                    sliding: int | None = None) -> Tensor:
        """Additive [batch * n_blocks, 1, W, n_global + n_pooled + S] mask of the banded
        computation (S = 2W keys, 3W with bidirectional image blocks), built once per plan,
        dtype and sliding window and shared by every layer: each key also needs the model's
        own permission (causal or same image block, inside ``sliding`` if given, not
        padding)."""
        key = (self.window, dtype, sliding)
        if key in plan._block_mask:
            return plan._block_mask[key]
        w, t = self.window, plan.seq_len
        ahead = w if plan.block is not None else 0
        nb = -(-t // w)
        b = plan.valid.shape[0]
        i = torch.arange(nb * w, device=device).view(nb, w)[None, :, :, None]  # query index
        blk_q = plan.block[:, i[0, :, :, 0].clamp(max=t - 1)][..., None] \
            if plan.block is not None else None  # [b, nb, w, 1]

        def own(j: Tensor, blk_j: Tensor | None) -> Tensor:
            """The model's own mask for keys j (broadcast against i)."""
            ok = j <= i
            if blk_q is not None:
                ok = ok | ((blk_q == blk_j) & (blk_q >= 0))
            if sliding is not None:
                ok = ok & (j > i - sliding)
            return ok

        def band(j: Tensor) -> Tensor:
            return (j >= i - w) & (j <= i + ahead)

        g = plan.glob_idx[:, None, None, :]
        blk_g = plan.block.gather(1, plan.glob_idx)[:, None, None, :] \
            if plan.block is not None else None
        glob = plan.glob_ok[:, None, None, :] & own(g, blk_g) & ~band(g)
        pool = plan.pool_ok[:, None, None, :] & (plan.pool_last[:, None, None, :] <= i)
        j = (torch.arange(nb, device=device) * w - w)[:, None] + torch.arange(2 * w + ahead,
                                                                               device=device)
        jc = j.clamp(0, t - 1)
        in_seq = (j >= 0) & (j < t)
        valid_j = (plan.valid[:, jc] & in_seq[None])[:, :, None, :]  # [b, nb, 1, S]
        blk_j = plan.block[:, jc][:, :, None, :] if plan.block is not None else None
        jj = j[None, :, None, :]
        slab = valid_j & band(jj) & own(jj, blk_j)
        neg = _neg(dtype)
        parts = [torch.where(glob, 0.0, neg),
                 torch.where(pool, plan.pool_bias[:, None, None, :], neg),
                 torch.where(slab, 0.0, neg)]
        mask = torch.cat(parts, -1).to(dtype).reshape(b * nb, 1, w, -1)
        plan._block_mask[key] = mask
        return mask

    def _stream_prefill(self, q: Tensor, k: Tensor, v: Tensor, scaling: float,
                        plan: _Plan, sliding: int | None = None) -> Tensor:
        b, hs, t, d = q.shape
        kvs = k.shape[1]
        w = self.window
        ahead = w if plan.block is not None else 0  # bidirectional blocks: a two-sided band
        nb = -(-t // w)
        tp = nb * w
        qb = F.pad(q, (0, 0, 0, tp - t)).view(b, hs, nb, w, d).transpose(1, 2)
        qb = qb.reshape(b * nb, hs, w, d)
        kg, vg = self._globals(k, v, plan)
        n_g = kg.shape[2]

        def keys(x: Tensor, xg: Tensor) -> Tensor:
            n_s = 2 * w + ahead
            slab = F.pad(x, (0, 0, w, tp - t + ahead)).unfold(2, n_s, w)  # [b, kv, nb, d, S]
            slab = slab.permute(0, 2, 1, 4, 3)  # [b, nb, kv, S, d]
            glob = xg[:, None].expand(b, nb, kvs, n_g, d)
            return torch.cat([glob, slab], 3).reshape(b * nb, kvs, n_g + n_s, d)

        mask = self._block_mask(plan, q.dtype, q.device, sliding)
        z = F.scaled_dot_product_attention(qb, keys(k, kg), keys(v, vg), attn_mask=mask,
                                           scale=scaling, enable_gqa=hs != kvs)
        return z.view(b, nb, hs, w, d).transpose(1, 2).reshape(b, hs, tp, d)[:, :, :t]

    # --- cached decoding -----------------------------------------------------------------------
    def _store(self, layer: int, split: _LayerSplit, k: Tensor, v: Tensor, plan: _Plan) -> None:
        c = self._cache
        c.kf[layer] = k[:, split.full_kv].contiguous()
        c.vf[layer] = v[:, split.full_kv].contiguous()
        ks, vs = k[:, split.stream_kv], v[:, split.stream_kv]
        kg, vg = self._globals(ks, vs, plan)
        tail = c._tail_idx
        c.ks[layer] = torch.cat([kg, _gather_heads(ks, tail)], 2)
        c.vs[layer] = torch.cat([vg, _gather_heads(vs, tail)], 2)

    def _start_cache(self, plan: _Plan) -> HybridCache:
        c = HybridCache(self.n_layers, self.window, self.sliding)
        b, t = plan.valid.shape
        dev = plan.valid.device
        c.length = t
        # window-only entries: the last `window` prompt tokens that are not kept for good
        tail = torch.arange(max(t - self.window, 0), t, device=dev)[None].expand(b, -1)
        glob = plan.glob
        tail_ok = plan.valid.gather(1, tail) & ~glob.gather(1, tail)
        n_tail = int(tail_ok.sum(-1).max()) if b else 0  # keep only those not kept for good
        order = torch.argsort((~tail_ok).to(torch.int8), dim=1, stable=True)[:, :n_tail]
        tail, tail_ok = tail.gather(1, order), tail_ok.gather(1, order)
        c._tail_idx = tail.contiguous()  # type: ignore[attr-defined]
        slots = _Slots(
            f_pos=torch.arange(t, device=dev)[None].expand(b, t), f_ok=plan.valid.clone(),
            s_pos=torch.cat([plan.glob_idx, plan.pool_last, tail], 1),
            s_kind=torch.cat([torch.zeros_like(plan.glob_idx), torch.full_like(plan.pool_last, 2),
                              torch.ones_like(tail)], 1),
            s_ok=torch.cat([plan.glob_ok, plan.pool_ok, tail_ok], 1),
            s_bias=torch.cat([torch.zeros(b, plan.glob_idx.shape[1], device=dev),
                              plan.pool_bias, torch.zeros(b, tail.shape[1], device=dev)], 1))
        c.slots = {sw: slots.repeat(1) for sw in set(self.sliding)}
        return c

    def _decode(self, call: KernelCall, split: _LayerSplit) -> Tensor:
        c = self._cache
        q, k, v = call.q, call.k, call.v
        if q.shape[2] != 1:
            raise InputError("hybrid cached decoding runs one token per step")
        l = call.layer
        b, h, _, d = q.shape
        z = q.new_empty(b, h, 1, d)
        full_mask, stream_mask = c.masks[self.sliding[l]]
        slots = c.slots[self.sliding[l]]
        if len(split.full_q):
            nf = slots.f_pos.shape[1]
            kf = c._append("kf", l, k[:, split.full_kv], nf)
            vf = c._append("vf", l, v[:, split.full_kv], nf)
            zf = F.scaled_dot_product_attention(q[:, split.full_q], kf, vf,
                                                attn_mask=full_mask, scale=call.scaling,
                                                enable_gqa=self.n_rep > 1)
            if len(split.stream_q) == 0:
                return zf
            z[:, split.full_q] = zf
        ns = slots.s_pos.shape[1]
        ks = c._append("ks", l, k[:, split.stream_kv], ns)
        vs = c._append("vs", l, v[:, split.stream_kv], ns)
        z[:, split.stream_q] = F.scaled_dot_product_attention(
            q[:, split.stream_q], ks, vs, attn_mask=stream_mask, scale=call.scaling,
            enable_gqa=self.n_rep > 1)
        return z

    @torch.no_grad()
    def prefill(self, batch: MultimodalBatch) -> tuple[Tensor, HybridCache, Tensor]:
        """Run the prompt, building the hybrid cache: (last-position logits [b, vocab],
        cache, next position ids [b]: the first generated token's id; under M-RoPE the id all
        three rows take, the prompt's largest + 1)."""
        _check_family(self.model, "supports_hybrid_attention", "hybrid cached decoding")
        ids, kw = self.model._inputs(batch)
        nxt, mrope = _next_positions(kw)
        plan = self._plan_for(batch)
        self._plan, self._cache, self._building = plan, self._start_cache(plan), True
        try:
            with self.model.attention.kernel(self._kernel):
                out = self.model.hf_model(input_ids=ids, **kw, use_cache=False, logits_to_keep=1)
        finally:
            cache, self._cache, self._building, self._plan = self._cache, None, False, None
        cache.mrope = mrope
        cache.trim()
        return out.logits[:, -1], cache, nxt

    @torch.no_grad()
    def decode_step(self, tokens: Int[Tensor, " batch"], positions: Int[Tensor, " batch"],
                    cache: HybridCache) -> Tensor:
        """One greedy step: feed ``tokens`` at ``positions`` (one id per example; under M-RoPE
        the same id in all three rows); returns logits [b, vocab]."""
        cache.begin_step(next(self.model.hf_model.parameters()).dtype)
        self._cache = cache
        try:
            with self.model.attention.kernel(self._kernel):
                out = self.model.hf_model(input_ids=tokens[:, None],
                                          position_ids=_step_positions(positions, cache.mrope),
                                          use_cache=False)
        finally:
            self._cache = None
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: MultimodalBatch, max_new_tokens: int = 20,
                 return_logits: bool = False) -> Any:
        """Greedy decoding with the hybrid KV cache: new token ids [b, n] (and the logits of
        every step, [b, n, vocab], if ``return_logits``)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        logits, cache, pos = self.prefill(batch)
        cache.reserve(max_new_tokens - 1)
        toks, steps = [], []
        for s in range(max_new_tokens):
            steps.append(logits)
            tok = logits.argmax(-1)
            toks.append(tok)
            if s + 1 < max_new_tokens:
                logits = self.decode_step(tok, pos + s, cache)
        self.last_cache = cache
        out = torch.stack(toks, 1)
        return (out, torch.stack(steps, 1)) if return_logits else out


__all__ = ["DECODE_FAMILIES", "PREFILL_FAMILIES", "HybridAttention", "HybridCache"]
