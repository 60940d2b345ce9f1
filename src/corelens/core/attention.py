"""The decoder attention forward that corelens owns.

TransformerLens's bridge computes attention eagerly (every [heads, T, T] pattern is built) or,
for Qwen-VL, delegates to HF and fires ``hook_pattern`` after the fact, so edits to it change
nothing. corelens replaces the forward of every decoder attention bridge with one function:

- memory-efficient attention (``scaled_dot_product_attention``) by default;
- the eager path, with ``hook_attn_scores`` (pre-softmax) and ``hook_pattern`` (post-softmax)
  inside the computation so edits propagate, only while a hook on either is live (or
  ``mode="eager"``);
- a per-head interface shared by everything above it: ``key_mask`` (which keys each head may
  see, combined with the model's own causal / padding / window mask) and ``tap`` (a callback
  that receives the rotated q, k, v and the mask of a layer, and can compute exact attention
  rows for chosen queries without the full pattern, see ``AttentionInputs.pattern_rows``);
- two shortcuts for batched interventions (``interventions.core.sweep``): ``replay`` (a layer
  returns ``o_proj`` of recorded head outputs z, its ``hook_z`` firing on them, instead of
  computing q, k, v and the scores) and ``keys_from`` (a layer's call carries only its last
  query rows; its keys and values come from every row).

Every family's specifics come from the HF module itself (``scaling``, ``q_norm``/``k_norm``, the
4-D mask HF builds with its windows and bidirectional blocks, GQA) and from the family's
``rotary`` (M-RoPE). Configurations this forward does not reproduce fall back to the bridge's
own forward, which is always eager.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from corelens import compat

Mode = Literal["auto", "sdpa", "eager"]


@dataclass
class AttentionInputs:
    """What one decoder attention layer attends with, after RoPE and the KV cache.

    ``q``: ``Float[Tensor, "batch head q_pos d_head"]``; ``k`` / ``v``:
    ``Float[Tensor, "batch kv_head k_pos d_head"]`` (under GQA ``n_rep`` query heads share a KV
    head); ``mask``: additive, ``Float[Tensor, "batch one_or_head q_pos k_pos"]``, or None for
    plain causal. A ``tap`` on ``model.attention`` receives one at every call of its layer.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))
        rows = batch.last_prompt_positions[:, None]  # Int[Tensor, "batch r"]
        seen = []
        with model.attention.tap(0, lambda a: seen.append(a.pattern_rows(rows))):
            model(batch)
        seen[0].shape  # Float[Tensor, "batch head r k_pos"]: [2, 4, 1, seq]; rows sum to 1
        ```
    """

    layer: int
    q: Float[Tensor, "batch head q_pos d_head"]
    k: Float[Tensor, "batch kv_head k_pos d_head"]
    v: Float[Tensor, "batch kv_head k_pos d_head"]
    mask: Float[Tensor, "batch one_or_head q_pos k_pos"] | None  # additive; None = causal
    scaling: float

    @property
    def n_rep(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def scores_rows(self, rows: Int[Tensor, "batch r"]) -> Float[Tensor, "batch head r k_pos"]:
        """Pre-softmax scores of query rows ``rows[b]`` (indexes into this call's queries)."""
        b, h, tq, d = self.q.shape
        tk = self.k.shape[2]
        idx = rows.to(self.q.device)
        q = torch.gather(self.q, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))
        k = self.k.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else self.k
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        if self.mask is not None:
            m = self.mask
            m = torch.gather(m, 2, idx[:, None, :, None].expand(b, m.shape[1], idx.shape[1], tk)
                             if m.shape[0] == b else
                             idx[:1, None, :, None].expand(1, m.shape[1], idx.shape[1], tk))
            scores = scores + m
        else:
            q_abs = idx + (tk - tq)
            causal = torch.arange(tk, device=idx.device)[None, None, :] > q_abs[:, :, None]
            scores = scores.masked_fill(causal[:, None], torch.finfo(scores.dtype).min)
        return scores

    def pattern_rows(self, rows: Int[Tensor, "batch r"],
                     dtype: torch.dtype | None = None) -> Float[Tensor, "batch head r k_pos"]:
        """Exact softmax attention of query rows ``rows[b]``: O(r * T) memory, not O(T^2).

        ``dtype``: of the result (default: the model's). ``torch.float32`` on a bf16/fp16 model
        also computes the q.k scores in fp32 (from the model's q and k), so the rows carry no
        half-precision rounding of their own (what RAM does: metrics accumulate in fp32)."""
        if dtype == torch.float32 and self.q.dtype != torch.float32:
            mask = self.mask.float() if self.mask is not None else None
            full = AttentionInputs(self.layer, self.q.float(), self.k.float(), self.v, mask,
                                   self.scaling)
            return torch.softmax(full.scores_rows(rows), dim=-1)
        return torch.softmax(self.scores_rows(rows).float(), dim=-1).to(dtype or self.q.dtype)


Tap = Callable[[AttentionInputs], None]


@dataclass
class KernelCall:
    """One decoder attention call offered to a substitute kernel (``AttentionBackend.kernel``).

    ``q``, ``k``, ``v`` are this call's rotated states, BEFORE the KV cache; ``mask`` is HF's
    4-D mask as passed (bool or additive; None when plainly causal). A kernel returns ``z``
    ([batch, head, q_pos, d_head]) or None to leave the call to the default path, in which
    case it must not have touched the cache (``update_cache`` does the default update).
    """

    attn: Any
    layer: int
    q: Float[Tensor, "batch head q_pos d_head"]
    k: Float[Tensor, "batch kv_head q_pos d_head"]
    v: Float[Tensor, "batch kv_head q_pos d_head"]
    mask: Tensor | None
    scaling: float
    kwargs: dict[str, Any]

    @property
    def hf_cache(self) -> Any | None:
        """The HF ``Cache`` this call was handed (None: no cache)."""
        return compat.kv_cache(self.kwargs)

    def update_cache(self) -> tuple[Tensor, Tensor]:
        return compat.update_kv_cache(self.attn.original_component, self.k, self.v, self.kwargs)


Kernel = Callable[[KernelCall], "Tensor | None"]


class _HeadsToPosition(compat.BaseTensorConversion):
    """Hooks on ``hook_rot_q/k`` see TransformerLens's [batch, pos, head, d_head]."""

    def handle_conversion(self, x: Tensor, *context: Any) -> Tensor:
        return x.transpose(1, 2) if x.ndim == 4 else x

    def revert(self, x: Tensor, *context: Any) -> Tensor:
        return x.transpose(1, 2) if x.ndim == 4 else x


def additive_mask(mask: Tensor | None, dtype: torch.dtype, tq: int, tk: int) -> Tensor | None:
    """HF's 4-D mask (bool or additive) as an additive float mask cut to [.., tq, tk]."""
    if mask is None:
        return None
    if mask.ndim != 4:
        raise ValueError(f"corelens attention expects HF's 4-D attention mask, got {mask.ndim}-D")
    mask = mask[..., -tq:, :tk]
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask.to(dtype)


def causal_mask(tq: int, tk: int, dtype: torch.dtype,
                device: torch.device) -> Float[Tensor, "1 1 tq tk"]:
    """The additive causal mask of ``tq`` queries, the last rows of ``tk`` keys."""
    causal = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    return torch.where(causal, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


class AttentionBackend:
    """Owns the decoder attention of one HookedMLLM (installed on its bridge's blocks).

    ``model.attention`` is this backend. The decoder runs SDPA unless a hook on
    ``hook_pattern`` / ``hook_attn_scores`` is live (or within ``use("eager")``), and each head
    can be steered: ``key_mask`` (the keys a head may see, a
    ``Bool[Tensor, "batch_or_1 head_or_1 q_or_1 k_pos"]``), ``tap`` (a layer's
    ``AttentionInputs``: exact attention rows without a ``T x T`` pattern), ``kernel`` (compute
    the attention yourself, as ``corelens.accel`` does).

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))
        text_only = ~batch.layout.vision_mask()[:, None, None, :]  # [batch, 1, 1, k_pos]
        with model.attention.key_mask(layer=0, allowed=text_only):  # layer 0 sees no image
            blind = model(batch)
        with model.attention.use("eager"):  # the pattern is computed, its hooks fire
            logits = model(batch)
        ```
    """

    def __init__(self, bridge: Any, rotary: Callable[..., tuple[Tensor, Tensor]],
                 hf_config: Any = None) -> None:
        self.mode: Mode = "auto"
        self.rotary = rotary
        self._key_masks: dict[int, list[Tensor]] = {}
        self._taps: dict[int, list[Tap]] = {}
        self._kernel: Kernel | None = None
        self._replay: dict[int, Tensor] = {}
        self._keys_from: dict[int, Tensor] = {}
        self.layers: list[Any] = []
        added = False
        for layer, block in enumerate(bridge.blocks):
            attn = block.attn
            for name in ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern"):
                if not isinstance(getattr(attn, name, None), HookPoint):
                    setattr(attn, name, HookPoint())
                    if name.startswith("hook_rot"):
                        getattr(attn, name).hook_conversion = _HeadsToPosition()
                    added = True
            attn._corelens_layer = layer
            attn._corelens_backend = self
            attn._corelens_original_forward = attn.forward
            # what a replayed call skips: every hook point of the attention before hook_z
            after_z = {id(attn.o.hook_in), id(attn.o.hook_out), id(attn.hook_out)}
            attn._corelens_before_z = [m for m in attn.modules() if isinstance(m, HookPoint)
                                       and id(m) not in after_z]
            compat.replace_forward(attn, _forward)
            self.layers.append(attn)
        if hf_config is not None:
            # The bridge forced eager attention, so HF builds a float [b, 1, T, T] mask for the
            # decoder even when it is plain causal. With "sdpa" HF passes None (causal, no
            # padding) or a bool mask: the decoder attention is ours either way, and the
            # O(T^2) mask is gone. Vision towers keep eager (their pattern hooks need it).
            text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else None
            if text is not None and text is not hf_config:
                compat.set_attn_implementation(text, "sdpa")
        self._vision_switch(bridge)
        if added:  # let the bridge's hook registry see the hook points it lacked
            compat.refresh_hook_registry(bridge)

    def _vision_switch(self, bridge: Any) -> None:
        """The vision tower runs SDPA too, and eager only while one of its pattern hooks is
        live (the bridge fires those hooks from HF's eager attention weights). ``use("eager")``
        is the decoder's: at real resolution an eager tower materialises [heads, T, T] per
        block (Qwen2.5-VL's full-attention blocks at 4,784 tokens: ~23 GB), for nothing."""
        tower = getattr(bridge, "vision_encoder", None)
        if tower is None:
            return
        hooks = [hp for name, hp in bridge.hook_dict.items() if name.startswith("vision")
                 and name.endswith(("hook_pattern", "hook_attn_scores"))]
        configs = {id(c): c for m in tower.modules()
                   if (c := getattr(m, "config", None)) is not None
                   and compat.has_attn_implementation(c)
                   and not type(c).__name__.startswith("TransformerBridge")}

        def switch(module: Any, args: Any) -> None:
            eager = any(compat.has_hooks(hp) for hp in hooks)
            for c in configs.values():
                compat.set_attn_implementation(c, "eager" if eager else "sdpa")

        tower.register_forward_pre_hook(switch)

    # --- the per-head interface --------------------------------------------------------------
    @contextlib.contextmanager
    def key_mask(
        self, layer: int, allowed: Bool[Tensor, "batch_or_1 head_or_1 q_or_1 k_pos"]
    ) -> Iterator[None]:
        """Within the block, head h of ``layer`` attends only to keys where ``allowed`` is True
        (on top of the model's own mask). Broadcast over batch / heads / queries."""
        if allowed.dtype != torch.bool or allowed.ndim != 4:
            raise ValueError("key_mask wants a 4-D bool tensor [batch|1, head|1, q|1, k]")
        self._key_masks.setdefault(layer, []).append(allowed)
        try:
            yield
        finally:
            self._key_masks[layer] = [m for m in self._key_masks[layer] if m is not allowed]

    @contextlib.contextmanager
    def tap(self, layer: int, fn: Tap) -> Iterator[None]:
        """Within the block, call ``fn(AttentionInputs)`` every time ``layer`` attends."""
        self._taps.setdefault(layer, []).append(fn)
        try:
            yield
        finally:
            self._taps[layer] = [t for t in self._taps[layer] if t is not fn]

    @contextlib.contextmanager
    def kernel(self, fn: Kernel) -> Iterator[None]:
        """Within the block, offer every non-eager attention call to ``fn(KernelCall)`` first:
        it may compute the attention itself (e.g. over fewer keys) and own the KV cache. Layers
        whose pattern is hooked (eager) never reach it. One kernel at a time."""
        if self._kernel is not None:
            raise RuntimeError("an attention kernel is already installed on this model")
        self._kernel = fn
        try:
            yield
        finally:
            self._kernel = None

    @contextlib.contextmanager
    def replay(self, layer: int, z: Float[Tensor, "batch pos head_x_d_head"]) -> Iterator[None]:
        """Within the block, ``layer`` does not compute its attention: it returns
        ``o_proj(z)`` (``z``: the input of ``o_proj``, as recorded from an earlier call with the
        same inputs), ``hook_z`` firing on ``z`` as usual, so an edit there acts as on a computed
        z. A call with a live hook on any hook point before ``hook_z`` in the layer (q, k, v,
        rotary, scores, pattern, ...), or one this forward does not own, computes instead."""
        self._replay[layer] = z
        try:
            yield
        finally:
            self._replay.pop(layer, None)

    @contextlib.contextmanager
    def keys_from(self, layer: int, hidden: Float[Tensor, "batch pos d_model"]) -> Iterator[None]:
        """Within the block, the calls of ``layer`` carry only the LAST query rows of the
        sequence (their ``hidden_states`` have ``t < pos`` rows): the keys and values come from
        ``hidden`` (the attention input of every row), the queries from the call's rows.
        ``can_trim(layer)`` says whether this forward honours it."""
        self._keys_from[layer] = hidden
        try:
            yield
        finally:
            self._keys_from.pop(layer, None)

    def can_trim(self, layer: int) -> bool:
        """Whether ``layer``'s calls would honour ``keys_from`` and ``replay``: corelens owns its
        forward, and no tap, kernel or live hook before ``hook_z`` would see fewer rows."""
        attn = self.layers[layer]
        return _unsupported(attn, attn.original_component) is None and _replayable(self, attn)

    @contextlib.contextmanager
    def use(self, mode: Mode) -> Iterator[None]:
        """Within the block the decoder attention runs ``mode``: "eager" (the pattern is
        computed, its hooks fire), "sdpa", or "auto" (eager only where a pattern hook is live).
        The vision tower is not switched (it goes eager only for its own pattern hooks)."""
        old, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = old

    def _eager(self, attn: Any) -> bool:
        if self.mode == "eager":
            return True
        if self.mode == "sdpa":
            return False
        return compat.has_hooks(attn.hook_pattern) or compat.has_hooks(attn.hook_attn_scores)

    def _mask(self, layer: int, base: Tensor | None, dtype: torch.dtype, tq: int, tk: int,
              device: torch.device) -> Tensor | None:
        extra = self._key_masks.get(layer)
        if not extra:
            return base
        if base is None:
            base = causal_mask(tq, tk, dtype, device)
        neg = torch.finfo(dtype).min
        for allowed in extra:
            allowed = allowed.to(device)
            if allowed.shape[-2] > 1:  # per query row: the live queries are the last rows
                allowed = allowed[..., -tq:, :]
            if allowed.shape[-1] < tk:  # keys added since (decoding): not restricted
                pad = torch.ones(*allowed.shape[:-1], tk - allowed.shape[-1], dtype=torch.bool,
                                 device=device)
                allowed = torch.cat([allowed, pad], dim=-1)
            base = base + torch.where(allowed[..., :tk], 0.0, neg).to(dtype)
        return base.clamp(min=neg)


def _unsupported(attn: Any, hf_attn: Any) -> str | None:
    cfg = attn.config
    if attn.training and getattr(hf_attn, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    for flag in ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj"):
        if getattr(cfg, flag, False):
            return flag
    for attr in ("attn_logit_softcapping", "sinks", "key_multiplier"):
        if getattr(hf_attn, attr, None) is not None:
            return attr
    if getattr(getattr(hf_attn, "config", None), "clip_qkv", None) is not None:
        return "clip_qkv"
    if getattr(attn, "compatibility_mode", False):
        return "compatibility mode"
    qn = getattr(hf_attn, "q_norm", None)
    w = getattr(qn, "weight", None)
    if isinstance(w, Tensor) and w.numel() != hf_attn.head_dim:
        return "q_norm over all heads"
    return None


def _replayable(backend: AttentionBackend, attn: Any) -> bool:
    """Whether a call may skip what comes before hook_z (or see fewer query rows) unseen: no
    live hook there, no tap, no kernel."""
    return (backend._kernel is None and not backend._taps.get(attn._corelens_layer)
            and not any(compat.has_hooks(hp) for hp in attn._corelens_before_z))


def _forward(attn: Any, *args: Any, **kwargs: Any) -> Any:
    backend: AttentionBackend = attn._corelens_backend
    hf_attn = attn.original_component
    if _unsupported(attn, hf_attn) is not None:
        return attn._corelens_original_forward(*args, **kwargs)
    if "hidden_states" in kwargs:
        hidden = kwargs.pop("hidden_states")
    else:
        hidden, args = args[0], args[1:]
    position_embeddings = kwargs.pop("position_embeddings", None)
    mask = kwargs.pop("attention_mask", None)
    layer = attn._corelens_layer
    b, t = hidden.shape[:2]

    replayed = backend._replay.get(layer)
    if replayed is not None and _replayable(backend, attn):
        return _project(attn, replayed, t), None
    hidden = attn.hook_in(hidden)
    every = backend._keys_from.get(layer)  # the keys' rows when this call has the last queries
    kv_hidden = hidden if every is None else every
    tk_in = kv_hidden.shape[1]
    d = hf_attn.head_dim
    q = attn.q(hidden).view(b, t, -1, d)
    k = attn.k(kv_hidden).view(b, tk_in, -1, d)
    v = attn.v(kv_hidden).view(b, tk_in, -1, d)
    if getattr(hf_attn, "q_norm", None) is not None:  # per-head q/k norm (Qwen3, Gemma3)
        q = hf_attn.q_norm(q)
        k = hf_attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    if position_embeddings is not None:
        position_embeddings = compat.apply_position_embedding_hooks(attn, position_embeddings)
        cos, sin = position_embeddings
        if tk_in > t:  # the last t rows: rotate them in place among every row (any RoPE layout)
            full = q.new_zeros(b, q.shape[1], tk_in, d)
            full[:, :, -t:] = q
            full, k = backend.rotary(full, k, cos, sin, hf_attn)
            q = full[:, :, -t:]
        else:
            q, k = backend.rotary(q, k, cos, sin, hf_attn)
    q = attn.hook_rot_q(q)
    k = attn.hook_rot_k(k)
    scaling = float(getattr(hf_attn, "scaling", d ** -0.5))
    if backend._kernel is not None and not backend._eager(attn) and every is None:
        z = backend._kernel(KernelCall(attn, layer, q, k, v, mask, scaling, kwargs))
        if z is not None:
            return _output(attn, z, b, t), None
    k, v = compat.update_kv_cache(hf_attn, k, v, kwargs)

    tq, tk = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    add_mask = backend._mask(layer, additive_mask(mask, q.dtype, tq, tk), q.dtype, tq, tk, q.device)
    if add_mask is None and 1 < tq < tk:  # causal, the queries the last tq rows
        add_mask = causal_mask(tq, tk, q.dtype, q.device)

    for tap in backend._taps.get(layer, ()):
        tap(AttentionInputs(layer, q, k, v, add_mask, scaling))

    pattern = None
    if backend._eager(attn):
        kx = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
        vx = v.repeat_interleave(n_rep, dim=1) if n_rep > 1 else v
        scores = torch.matmul(q, kx.transpose(-1, -2)) * scaling
        if add_mask is None:  # as an additive mask: a broadcast masked_fill costs ~7x an add
            add_mask = causal_mask(tq, tk, q.dtype, q.device)
        scores = scores + add_mask
        scores = attn.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = attn.hook_pattern(pattern)
        z = torch.matmul(pattern, vx)
    else:
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=add_mask, scale=scaling, enable_gqa=n_rep > 1,
            is_causal=add_mask is None and tq == tk and tq > 1,
        )
    return _output(attn, z, b, t), pattern


def _project(attn: Any, z: Float[Tensor, "batch pos head_x_d_head"], t: int) -> Tensor:
    """The attention output of a replayed call: ``o_proj`` of ``z``'s last ``t`` rows,
    ``hook_z`` (``o.hook_in``) fired on all of ``z``."""
    if z.shape[1] == t:
        return attn.hook_out(attn.o(z))
    if compat.has_hooks(attn.o.hook_out):
        return attn.hook_out(attn.o(z)[:, -t:])
    return attn.hook_out(attn.o.original_component(attn.o.hook_in(z)[:, -t:]))


def _output(attn: Any, z: Tensor, b: int, t: int) -> Tensor:
    z = z.transpose(1, 2).reshape(b, t, -1)
    o_weight = getattr(getattr(attn.o, "original_component", None), "weight", None)
    if isinstance(o_weight, Tensor) and o_weight.is_floating_point() and z.dtype != o_weight.dtype:
        z = z.to(o_weight.dtype)
    return attn.hook_out(attn.o(z))
