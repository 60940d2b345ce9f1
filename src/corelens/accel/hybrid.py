"""CoRe-guided hybrid attention (the variants are defined in ``corelens.accel``'s docstring)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from corelens.accel.cache import HybridCache, Slots
from corelens.accel.decoding import (
    check_family,
    gather_heads,
    neg_inf,
    next_positions,
    sliding_windows,
    step_positions,
    text_config,
)
from corelens.accel.plan import StreamPlan, layout_masks, plan_streaming
from corelens.accel.split import LayerSplit, split_layer
from corelens.core.attention import KernelCall, additive_mask
from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.families import FAMILIES
from corelens.heads import Head

# the registered families whose traits allow hybrid attention (prefill and cached decoding)
PREFILL_FAMILIES = frozenset(n for n, f in FAMILIES.items() if f.supports_hybrid_attention)
DECODE_FAMILIES = PREFILL_FAMILIES


class HybridAttention:
    """CoRe heads attend fully, the others see sinks + window + text (+ pooled vision).

    Use ``with hybrid.attach(batch): model(batch)`` (or ``attach()`` to plan from every
    ``MultimodalBatch`` the model is called on, e.g. inside ``corelens.core.evaluate``), and
    ``hybrid.generate(batch, n)`` for greedy decoding with the hybrid KV cache.
    """

    def __init__(self, model: Any, heads: Sequence[Head], n_sink: int = 4, window: int = 64,
                 n_pooled: int = 0) -> None:
        check_family(model, "supports_hybrid_attention", "hybrid attention")
        if window < 1 or n_sink < 0 or n_pooled < 0:
            raise InputError("hybrid attention wants window >= 1, n_sink >= 0, n_pooled >= 0")
        tc = text_config(model)
        self.model = model
        self.n_layers = tc.num_hidden_layers
        self.n_heads = tc.num_attention_heads
        self.n_kv = getattr(tc, "num_key_value_heads", None) or self.n_heads
        self.n_rep = self.n_heads // self.n_kv
        self.n_sink, self.window, self.n_pooled = n_sink, window, n_pooled
        # image tokens attending to each other both ways within each image block (HF's
        # ``token_type_ids`` / ``block_sequence_ids``: a run of consecutive image tokens)
        self.bidirectional = model.family.bidirectional_image_blocks
        self.sliding = sliding_windows(model)
        if n_pooled and (self.bidirectional or any(w is not None for w in self.sliding)):
            raise InputError("pooled summaries (n_pooled > 0) are not defined for models with "
                             "bidirectional image blocks or sliding-window layers; use "
                             "n_pooled=0")
        self.heads = sorted({(int(l), int(h)) for l, h in heads})
        for l, h in self.heads:
            if not (0 <= l < self.n_layers and 0 <= h < self.n_heads):
                raise InputError(f"head L{l}H{h} is outside this model "
                                 f"({self.n_layers} layers x {self.n_heads} heads)")
        full: list[set[int]] = [set() for _ in range(self.n_layers)]
        for l, h in self.heads:
            full[l].add(h)
        self.splits: list[LayerSplit] = [split_layer(f, self.n_heads, self.n_kv) for f in full]
        self._plan: StreamPlan | None = None
        self._cache: HybridCache | None = None
        self._building = False

    # --- head sets -------------------------------------------------------------------------
    @property
    def full_kv_heads(self) -> list[Head]:
        """(layer, kv_head) pairs whose KV cache keeps every token."""
        return [(l, int(g)) for l, s in enumerate(self.splits) for g in s.full_kv]

    @property
    def full_heads(self) -> list[Head]:
        """(layer, query head) pairs that attend fully: the CoRe heads. (Their GQA groups'
        other query heads are streaming heads reading the group's full KV cache.)"""
        return [(l, int(h)) for l, s in enumerate(self.splits) for h in s.full_q]

    @property
    def kv_budget(self) -> float:
        """Fraction of KV heads kept full."""
        return len(self.full_kv_heads) / (self.n_layers * self.n_kv)

    @classmethod
    def from_scores(cls, model: Any, scores: Any, kv_budget: float = 0.1,
                    reduce: str = "max", frac: float | None = None,
                    **kw: Any) -> "HybridAttention":
        """Plan at KV-group granularity: rank each layer's KV groups (the query heads sharing
        a KV head under GQA) by ``reduce`` ("max" or "mean") of their heads' scores
        (``HeadScores`` or a ``[layer, head]`` tensor; NaN ranks last) and keep the top
        ``ceil(kv_budget * layers * kv_heads)`` groups' KV cache full. Which query heads attend
        fully: without ``frac``, every query head of a kept group (the KV budget is then exact);
        with ``frac``, the ``ceil(frac * layers * heads)`` best-scoring query heads of the kept
        groups (a kept group left without one is not kept: the budget is then an upper
        bound), the other query heads of the kept groups streaming over the group's full
        cache. (``HybridAttention(model, scores.top(frac))`` keeps every group that holds a top
        head: with 7 query heads per KV head, a top-10% of heads fills most groups.)"""
        tc = text_config(model)
        n_layers, n_heads = tc.num_hidden_layers, tc.num_attention_heads
        n_kv = getattr(tc, "num_key_value_heads", None) or n_heads
        values = torch.as_tensor(getattr(scores, "scores", scores), dtype=torch.float32)
        if tuple(values.shape) != (n_layers, n_heads):
            raise InputError(f"scores are {tuple(values.shape)}, the model has "
                             f"{n_layers} layers x {n_heads} heads")
        if not 0 < kv_budget <= 1 or reduce not in ("max", "mean"):
            raise InputError("from_scores wants 0 < kv_budget <= 1 and reduce 'max' or 'mean'")
        if frac is not None and not 0 < frac <= 1:
            raise InputError(f"from_scores wants 0 < frac <= 1, got {frac}")
        rep = n_heads // n_kv
        values = values.nan_to_num(float("-inf"))
        groups = values.view(n_layers, n_kv, rep)
        ranked = groups.amax(-1) if reduce == "max" else groups.mean(-1)
        k = math.ceil(kv_budget * n_layers * n_kv)
        top = ranked.flatten().argsort(descending=True, stable=True)[:k].tolist()
        heads = [(i // n_kv, (i % n_kv) * rep + r) for i in top for r in range(rep)]
        if frac is not None:
            n = math.ceil(frac * n_layers * n_heads)
            heads = sorted(heads, key=lambda lh: -float(values[lh]))[:n]
        return cls(model, heads, **kw)

    @classmethod
    def random(cls, model: Any, n_kv_heads: int, seed: int = 0, n_heads: int | None = None,
               **kw: Any) -> "HybridAttention":
        """Random KV heads (``n_kv_heads`` of them, e.g. another plan's ``len(full_kv_heads)``)
        kept full: the random-head baseline at the same KV budget. Without ``n_heads`` every
        query head of those groups attends fully; with it, ``n_heads`` random query heads of
        those groups (at least one per group, e.g. another plan's ``len(full_heads)``), the
        others streaming."""
        tc = text_config(model)
        n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        rep = tc.num_attention_heads // n_kv
        pool = [(l, g) for l in range(tc.num_hidden_layers) for g in range(n_kv)]
        if not 0 <= n_kv_heads <= len(pool):
            raise InputError(f"n_kv_heads must be in [0, {len(pool)}], got {n_kv_heads}")
        rng = random.Random(seed)
        chosen = rng.sample(pool, n_kv_heads)
        if n_heads is None:
            return cls(model, [(l, g * rep + r) for l, g in chosen for r in range(rep)], **kw)
        if not n_kv_heads <= n_heads <= n_kv_heads * rep:
            raise InputError(f"n_heads must be in [{n_kv_heads}, {n_kv_heads * rep}] for "
                             f"{n_kv_heads} KV groups of {rep} query heads, got {n_heads}")
        one_each = [(l, g * rep + rng.randrange(rep)) for l, g in chosen]
        rest = [(l, g * rep + r) for l, g in chosen for r in range(rep)
                if (l, g * rep + r) not in one_each]
        return cls(model, one_each + rng.sample(rest, n_heads - n_kv_heads), **kw)

    def allowed(self, batch: MultimodalBatch, seq_len: int | None = None) -> list[Tensor]:
        """The per-head key mask equivalent to this hybrid (``n_pooled = 0``): per layer a bool
        [batch, head, seq, seq] for ``model.attention.key_mask``, which intersects it with the
        model's own mask (causal, padding, bidirectional image blocks, sliding windows): the
        streaming heads' (every query head but the CoRe heads, GQA group-mates included)
        sinks + text + the two-sided band ``|i - j| <= window``. ``seq_len`` >
        the batch's extends it with text tokens (generated ones). O(T^2): for tests and small
        inputs."""
        if self.n_pooled:
            raise InputError("pooled summaries are not keys of the sequence: no key mask")
        vision, valid = layout_masks(batch, torch.device("cpu"))
        t = seq_len or vision.shape[1]
        if t > vision.shape[1]:
            extra = t - vision.shape[1]
            vision = torch.cat([vision, torch.zeros(len(vision), extra, dtype=torch.bool)], 1)
            valid = torch.cat([valid, torch.ones(len(valid), extra, dtype=torch.bool)], 1)
        plan = plan_streaming(vision, valid, self.n_sink, 0)
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

    def _plan_for(self, batch: MultimodalBatch) -> StreamPlan:
        return plan_streaming(*layout_masks(batch, self.model.device), self.n_sink, self.n_pooled,
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
        if self._building:
            self._store(call.layer, split, k, v, plan)
        if len(split.stream_q) == 0:
            return self._full_prefill(q, k, v, split, call)
        sliding = self.sliding[call.layer]
        if len(split.stream_groups) == self.n_kv:  # every KV group has a streaming head
            z = self._stream_prefill(q, k, v, call.scaling, plan, sliding)
        else:
            z = q.new_empty(b, h, t, d)
            rows, groups = split.stream_group_q, split.stream_groups
            z[:, rows] = self._stream_prefill(q[:, rows], k[:, groups], v[:, groups],
                                              call.scaling, plan, sliding)
        if len(split.full_q):  # overwrites the full heads' rows of the streaming call
            z[:, split.full_q] = self._full_prefill(q, k, v, split, call)
        return z

    # --- prefill -----------------------------------------------------------------------------
    def _full_prefill(self, q: Float[Tensor, "b h t d"], k: Float[Tensor, "b kv t d"],
                      v: Float[Tensor, "b kv t d"], split: LayerSplit,
                      call: KernelCall) -> Float[Tensor, "b full t d"]:
        """The full query heads, exactly the model's attention (its own mask)."""
        t = q.shape[2]
        kf, vf = k[:, split.full_q_kv], v[:, split.full_q_kv]
        mask = additive_mask(call.mask, q.dtype, t, t)
        return F.scaled_dot_product_attention(
            q[:, split.full_q], kf, vf, attn_mask=mask, scale=call.scaling,
            is_causal=mask is None and t > 1, enable_gqa=len(split.full_q) != kf.shape[1])

    def _pooled(self, x: Float[Tensor, "b kv t d"],
                plan: StreamPlan) -> Float[Tensor, "b kv p d"]:
        """The pooled summaries' keys (or values): each chunk's mean."""
        return torch.einsum("bpt,bhtd->bhpd", plan.pool_w.to(x.dtype), x)

    def _globals(self, k: Tensor, v: Tensor, plan: StreamPlan) -> tuple[Tensor, Tensor]:
        kg, vg = gather_heads(k, plan.glob_idx), gather_heads(v, plan.glob_idx)
        if self.n_pooled:
            kg = torch.cat([kg, self._pooled(k, plan)], 2)
            vg = torch.cat([vg, self._pooled(v, plan)], 2)
        return kg, vg

    def _block_mask(self, plan: StreamPlan, dtype: torch.dtype, device: torch.device,
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
        neg = neg_inf(dtype)
        parts = [torch.where(glob, 0.0, neg),
                 torch.where(pool, plan.pool_bias[:, None, None, :], neg),
                 torch.where(slab, 0.0, neg)]
        mask = torch.cat(parts, -1).to(dtype).reshape(b * nb, 1, w, -1)
        plan._block_mask[key] = mask
        return mask

    def _stream_prefill(self, q: Tensor, k: Tensor, v: Tensor, scaling: float,
                        plan: StreamPlan, sliding: int | None = None) -> Tensor:
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
    def _store(self, layer: int, split: LayerSplit, k: Tensor, v: Tensor, plan: StreamPlan) -> None:
        c = self._cache
        kf, vf = k[:, split.full_kv], v[:, split.full_kv]
        # the pooled summaries first (none without n_pooled): slots as in _start_cache
        c.kf[layer] = torch.cat([self._pooled(kf, plan), kf], 2)
        c.vf[layer] = torch.cat([self._pooled(vf, plan), vf], 2)
        ks, vs = k[:, split.stream_kv], v[:, split.stream_kv]
        kg, vg = self._globals(ks, vs, plan)
        tail = c._tail_idx
        c.ks[layer] = torch.cat([kg, gather_heads(ks, tail)], 2)
        c.vs[layer] = torch.cat([vg, gather_heads(vs, tail)], 2)

    def _start_cache(self, plan: StreamPlan) -> HybridCache:
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
        slots = Slots(
            f_pos=torch.cat([plan.pool_last, torch.arange(t, device=dev)[None].expand(b, t)], 1),
            f_kind=torch.cat([torch.full_like(plan.pool_last, 2),
                              (plan.valid & ~glob).long()], 1),
            f_ok=torch.cat([plan.pool_ok, plan.valid], 1),
            f_bias=torch.cat([plan.pool_bias, torch.zeros(b, t, device=dev)], 1),
            s_pos=torch.cat([plan.glob_idx, plan.pool_last, tail], 1),
            s_kind=torch.cat([torch.zeros_like(plan.glob_idx), torch.full_like(plan.pool_last, 2),
                              torch.ones_like(tail)], 1),
            s_ok=torch.cat([plan.glob_ok, plan.pool_ok, tail_ok], 1),
            s_bias=torch.cat([torch.zeros(b, plan.glob_idx.shape[1], device=dev),
                              plan.pool_bias, torch.zeros(b, tail.shape[1], device=dev)], 1))
        c.slots = {sw: slots.repeat(1) for sw in set(self.sliding)}
        return c

    def _decode(self, call: KernelCall, split: LayerSplit) -> Float[Tensor, "b h 1 d"]:
        """One step: the query heads folded into rows of their KV group ([b, kv, rep, d]), so
        each cache is read once per group (no copy per query head): one call over the full
        cache (full query heads with the full mask, the full groups' streaming query heads
        with the streaming one), one over the streaming cache."""
        c = self._cache
        q, k, v = call.q, call.k, call.v
        if q.shape[2] != 1:
            raise InputError("hybrid cached decoding runs one token per step")
        l, sw = call.layer, self.sliding[call.layer]
        b, h, _, d = q.shape
        rows = q.reshape(b, self.n_kv, self.n_rep, d)
        slots = c.slots[sw]
        parts = []
        if len(split.full_kv):
            nf = slots.f_pos.shape[1]
            kf = c._append("kf", l, k[:, split.full_kv], nf)
            vf = c._append("vf", l, v[:, split.full_kv], nf)
            parts.append((split.full_kv, F.scaled_dot_product_attention(
                rows[:, split.full_kv], kf, vf, attn_mask=c.group_mask(sw, split.row_full),
                scale=call.scaling)))
        if len(split.stream_kv):
            ns = slots.s_pos.shape[1]
            ks = c._append("ks", l, k[:, split.stream_kv], ns)
            vs = c._append("vs", l, v[:, split.stream_kv], ns)
            parts.append((split.stream_kv, F.scaled_dot_product_attention(
                rows[:, split.stream_kv], ks, vs, attn_mask=c.masks[sw].stream,
                scale=call.scaling)))
        if len(parts) == 1:
            return parts[0][1].reshape(b, h, 1, d)
        z = q.new_empty(b, self.n_kv, self.n_rep, d)
        for kv, zp in parts:
            z[:, kv] = zp
        return z.view(b, h, 1, d)

    @torch.no_grad()
    def prefill(self, batch: MultimodalBatch) -> tuple[Tensor, HybridCache, Tensor]:
        """Run the prompt, building the hybrid cache: (last-position logits [b, vocab],
        cache, next position ids [b]: the first generated token's id; under M-RoPE the id all
        three rows take, the prompt's largest + 1)."""
        check_family(self.model, "supports_hybrid_attention", "hybrid cached decoding")
        ids, kw = self.model._inputs(batch)
        nxt, mrope = next_positions(kw)
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
                                          position_ids=step_positions(positions, cache.mrope),
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
