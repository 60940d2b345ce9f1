"""FastV: after layer k, drop the vision tokens the last prompt position attends to least
(the variants are defined in ``corelens.accel``'s docstring)."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import Tensor

from corelens.accel.cache import FastVCache
from corelens.accel.decoding import (
    check_family,
    next_positions,
    sliding_windows,
    step_positions,
    text_config,
)
from corelens.accel.plan import layout_masks
from corelens.core.attention import KernelCall
from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError


# --- FastV ------------------------------------------------------------------------------------
class FastV:
    """FastV: after layer ``k`` (layers ``0..k-1`` see every token) drop ``ratio`` of each
    example's vision tokens — those receiving the least attention from its last prompt position
    in layer ``k - 1``, averaged over heads; layers ``k..`` never compute them (their hidden
    states, their keys and values, their KV cache entries). Every example of a batch must have
    the same number of vision tokens."""

    def __init__(self, model: Any, k: int = 2, ratio: float = 0.5) -> None:
        check_family(model, "supports_fastv", "FastV")
        n = text_config(model).num_hidden_layers
        if not 1 <= k < n or not 0.0 <= ratio < 1.0:
            raise InputError(f"FastV wants 1 <= k < {n} and 0 <= ratio < 1")
        self.model, self.k, self.ratio = model, k, ratio
        self.keep: Tensor | None = None  # [b, kept] positions kept after layer k (last prefill)
        self.dropped: Tensor | None = None

    def _decoder(self) -> Any:
        dec = self.model.hf_model.get_decoder()
        if not hasattr(dec, "layers"):
            raise InputError("FastV: cannot find the decoder's layers")
        return dec

    @contextlib.contextmanager
    def attach(self, batch: MultimodalBatch | None = None) -> Iterator["FastV"]:
        """Prune within the block (for ``batch``, or each ``MultimodalBatch`` the model is
        called on). Logits at dropped positions read as zero hidden state."""
        state: dict[str, Any] = {}
        dev = self.model.device

        def plan(b: MultimodalBatch) -> None:
            vision, valid = layout_masks(b, dev)
            counts = vision.sum(-1)
            if not bool((counts == counts[0]).all()):
                raise InputError("FastV: every example of a batch needs the same number of "
                                 "vision tokens")
            state.update(vision=vision, last=b.last_prompt_positions.to(dev),
                         n_drop=int(int(counts[0]) * self.ratio), t=vision.shape[1])
            state.pop("keep", None)

        if batch is not None:
            plan(batch)
        dec = self._decoder()
        handles = []
        if batch is None:
            handles.append(self.model.register_forward_pre_hook(
                lambda m, a: plan(a[0]) if a and isinstance(a[0], MultimodalBatch) else None))

        def tap(inputs: Any) -> None:
            if "t" not in state or inputs.q.shape[2] != state["t"]:
                return
            rows = state["last"][:, None]
            att = inputs.pattern_rows(rows)[:, :, 0].float().mean(1)  # [b, t]
            att = att.masked_fill(~state["vision"], math.inf)
            drop = att.topk(state["n_drop"], dim=-1, largest=False).indices
            keep = torch.ones_like(state["vision"])
            keep.scatter_(1, drop, False)
            t = keep.shape[1]
            state["keep"] = torch.arange(t, device=dev)[None].expand(len(keep), t)[keep].view(
                len(keep), -1)
            self.keep, self.dropped = state["keep"], drop.sort(-1).values

        def prune(module: Any, args: Any, kwargs: Any) -> Any:
            keep = state.get("keep")
            if keep is None:
                return None
            t = state["t"]
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == t:
                hidden = torch.gather(hidden, 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
                if args:
                    args[0] = hidden
                else:
                    kwargs["hidden_states"] = hidden
            pe = kwargs.get("position_embeddings")
            if pe is not None and pe[0].shape[-2] == t:
                kwargs["position_embeddings"] = tuple(
                    torch.gather(x.expand(len(keep), -1, -1), 1,
                                 keep[..., None].expand(-1, -1, x.shape[-1])) for x in pe)
            pid = kwargs.get("position_ids")
            if isinstance(pid, Tensor) and pid.ndim == 2 and pid.shape[-1] == t:
                kwargs["position_ids"] = torch.gather(pid.expand(len(keep), -1), 1, keep)
            m = kwargs.get("attention_mask")
            if isinstance(m, Tensor) and m.ndim == 4 and m.shape[-1] == t:
                m = m.expand(len(keep), -1, -1, -1)
                m = torch.gather(m, 2, keep[:, None, :, None].expand(-1, m.shape[1], -1, t))
                kwargs["attention_mask"] = torch.gather(
                    m, 3, keep[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
            return tuple(args), kwargs

        def unprune(module: Any, args: Any, out: Any) -> Any:
            keep = state.get("keep")
            hs = getattr(out, "last_hidden_state", None)
            if keep is None or hs is None or hs.shape[1] != keep.shape[1]:
                return None
            full = hs.new_zeros(hs.shape[0], state["t"], hs.shape[-1])
            full.scatter_(1, keep[..., None].expand(-1, -1, hs.shape[-1]), hs)
            out.last_hidden_state = full
            state.pop("keep")  # decoding steps that follow are not pruned
            return out

        for layer in dec.layers[self.k:]:
            handles.append(layer.register_forward_pre_hook(prune, with_kwargs=True))
        handles.append(dec.register_forward_hook(unprune))
        side_inputs = self.model.family.prune_side_inputs(dec, lambda: state.get("keep"),
                                                           lambda: state["t"])
        try:
            with side_inputs, self.model.attention.tap(self.k - 1, tap):
                yield self
        finally:
            for hnd in handles:
                hnd.remove()

    @torch.no_grad()
    def generate(self, batch: MultimodalBatch, max_new_tokens: int = 20,
                 return_logits: bool = False) -> Any:
        """Greedy decoding on a ``FastVCache``: layers >= k cache only the kept tokens. New
        token ids [b, n] (and the logits of every step, [b, n, vocab], if ``return_logits``).
        A decoding step at sequence index ``i`` sees every cached key but the prompt's padding,
        and on a sliding-window layer (Gemma 3) only keys whose ORIGINAL index ``j > i -
        sliding_window``; those that leave the window are freed."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, kw = self.model._inputs(batch)
        nxt, mrope = next_positions(kw)
        valid = kw["attention_mask"].bool()
        cache = FastVCache(sliding_windows(self.model))

        def record(call: KernelCall) -> None:  # the prompt's keys / values, after pruning
            cache.k[call.layer], cache.v[call.layer] = call.k, call.v
            return None

        with self.attach(batch), self.model.attention.kernel(record):
            out = self.model.hf_model(input_ids=ids, **kw, use_cache=False, logits_to_keep=1)
        logits, t = out.logits[:, -1], valid.shape[1]
        full = torch.arange(t, device=valid.device)[None].expand(len(valid), t)
        for layer in range(len(cache.k)):
            if cache.k[layer] is None:
                raise InputError(f"FastV decoding: layer {layer} did not reach corelens's "
                                 "attention backend (an eager / hooked layer?)")
            pos = full if layer < self.k else self.keep
            cache.pos[layer], cache.ok[layer] = pos, valid.gather(1, pos)
        cache.length = t
        cache.trim()
        toks, steps = [], []
        with self.model.attention.kernel(cache.attend):
            for s in range(max_new_tokens):
                steps.append(logits)
                tok = logits.argmax(-1)
                toks.append(tok)
                if s + 1 < max_new_tokens:
                    out = self.model.hf_model(input_ids=tok[:, None],
                                              position_ids=step_positions(nxt + s, mrope),
                                              use_cache=False)
                    logits = out.logits[:, -1]
                    cache.length += 1
                    cache.trim()
        self.last_cache = cache
        out_toks = torch.stack(toks, 1)
        return (out_toks, torch.stack(steps, 1)) if return_logits else out_toks
