"""Attribution machinery shared by node (AtP, AtP*) and edge (EAP, EAP-IG) attribution:
activation taps, the batched backward, GradDrop edits, embedding interpolation."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.core.attention import AttentionInputs
from corelens.core.evaluate import logits_to_keep
from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.hook_names import EMBED, act_name
from corelens.interventions.core import Metric, image_features, stacked

Node = Literal["z", "q", "k", "v"]


# --- shared machinery ----------------------------------------------------------------------
def n_kv_heads(model: Any) -> int:
    return int(model.cfg.n_key_value_heads or model.cfg.n_heads)


def n_nodes(model: Any, node: str) -> int:
    if node not in ("z", "q", "k", "v"):
        raise InputError(f"node must be 'z', 'q', 'k' or 'v', not {node!r}")
    return int(model.cfg.n_heads) if node in ("z", "q") else n_kv_heads(model)


def attention_taps(model: Any, store: dict[int, Any],
                   layers: Iterable[int]) -> contextlib.ExitStack:
    """Record each layer's ``AttentionInputs`` (rotated q, k, the additive mask) in ``store``."""
    stack = contextlib.ExitStack()
    for layer in layers:
        def tap(inp: Any, layer: int = layer) -> None:
            store[layer] = inp
        stack.enter_context(model.attention.tap(layer, tap))
    return stack


def warn_side_inputs(model: Any, what: str) -> None:
    """Vision features injected past the decoder input (Qwen3-VL's DeepStack) are not on the
    interpolation path nor an EAP sender."""
    if model.family.vision_side_inputs:
        warnings.warn(f"{what}: this model injects vision features after the decoder input "
                      "(DeepStack); they stay the target's, so the interpolation path does not "
                      "end at the source run and no edge carries them (docs/causal.md)",
                      stacklevel=3)


def make_leaf(x: Tensor, hook: Any) -> Tensor:
    """Start the graph at the decoder input: nothing needs gradients through the vision tower
    and embeddings, and keeping their activations for the backward would cost memory."""
    return x.detach().requires_grad_(True)


def backward(
    model: Any, batch: MultimodalBatch, metric: Metric, names: Sequence[str], *, copies: int = 1,
    edits: Sequence[tuple[str, Callable]] = (), taps: dict[int, Any] | None = None,
    features: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward of ``copies`` stacked copies of ``batch`` (``edits`` may treat copies
    differently; the copies reuse the batch's image features) and one backward of ``sum over
    copies of mean over examples of metric``. Returns the activations and gradients at
    ``names`` ([copies * batch, ...], detached). ``features``: a dict shared by the calls of one
    loop, so the image features are computed once for all of them."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> Tensor:
            acts[name] = x
            return x
        return hook

    store = {} if features is None else features
    if copies > 1 and "image" not in store:
        store["image"] = image_features(model, batch)
    big, extra = stacked(model, batch, copies, store.get("image") if copies > 1 else None)
    hooks = [(EMBED, make_leaf), *edits, *[(n, keep(n)) for n in names]]
    with torch.enable_grad(), (attention_taps(model, taps, range(model.cfg.n_layers))
                               if taps is not None else contextlib.nullcontext()):
        logits = model.run_with_hooks(big, fwd_hooks=hooks,
                                      logits_to_keep=logits_to_keep(metric, big), **extra)
        value = metric(logits, big).float().view(copies, len(batch)).mean(1).sum()
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    return ({n: acts[n].detach() for n in names},
            {n: (g if g is not None else torch.zeros_like(acts[n])).detach()
             for n, g in zip(names, grads)})


def grad_drop_edits(model: Any, drops: Sequence[int | None], B: int) -> list[tuple[str, Callable]]:
    """Copy i of a stacked batch gets no gradient through layer ``drops[i]``'s residual
    contributions (attention and MLP outputs); its forward is unchanged."""
    edits = []
    for layer in sorted({d for d in drops if d is not None}):
        rows = [i for i, d in enumerate(drops) if d == layer]

        def drop(x: Tensor, hook: Any, rows: list[int] = rows) -> Tensor:
            x = x.clone()
            for i in rows:
                x[i * B:(i + 1) * B] = x[i * B:(i + 1) * B].detach()
            return x
        edits += [(act_name("attn_out", layer), drop), (act_name("mlp_out", layer), drop)]
    return edits


def interpolate(src_emb: Tensor, alphas: Sequence[float], B: int) -> tuple[str, Callable]:
    """An edit of the decoder input of stacked copies: copy i gets x_s + alpha_i (x - x_s),
    on the straight line from the source's input embeddings (0) to the run's own (1)."""
    a = torch.tensor(list(alphas))

    def hook(x: Tensor, hook: Any) -> Tensor:
        s = src_emb.to(x.device, x.dtype).repeat(len(a), 1, 1)
        w = a.to(x.device, x.dtype).repeat_interleave(B)[:, None, None]
        return s + w * (x - s)
    return (EMBED, hook)


def patterns(inp: Any, B: int, q: Tensor | None = None, k: Tensor | None = None,
              heads: Sequence[int] | None = None) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Exact softmax pattern (fp32) of the first ``B`` examples of one layer's tapped inputs,
    optionally with other (rotated) queries or keys, for the query heads ``heads`` only (one
    KV group at most; default: every head)."""
    q = (inp.q[:B] if q is None else q).detach()
    k = (inp.k[:B] if k is None else k).detach()
    mask = inp.mask
    if mask is not None:
        mask = (mask[:B] if mask.shape[0] > 1 else mask).detach().float()
    if heads is not None:
        rep = q.shape[1] // k.shape[1]
        groups = sorted({h // rep for h in heads})
        if len(groups) != 1:
            raise ValueError(f"heads {list(heads)} span KV groups {groups}")
        q, k = q[:, list(heads)], k[:, groups]
        if mask is not None and mask.shape[1] > 1:
            mask = mask[:, list(heads)]
    a = AttentionInputs(inp.layer, q.float(), k.float(), inp.v, mask, inp.scaling)
    tq = q.shape[2]
    return torch.softmax(a.scores_rows(torch.arange(tq, device=q.device).expand(B, tq)), dim=-1)
