"""Node attribution: AtP and AtP* (QK fix, GradDrop) of every head (see the package doc)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.hook_names import EMBED, act_name
from corelens.interventions.attribution.common import (
    Node,
    attention_taps,
    backward,
    grad_drop_edits,
    interpolate,
    n_nodes,
    patterns,
    warn_side_inputs,
)
from corelens.interventions.core import Metric, cache_activations, check_aligned


# --- node attribution: AtP and AtP* --------------------------------------------------------
def attribute_heads(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, node: Node = "z", qk_fix: bool = False, grad_drop: bool = False,
    ig_steps: int | None = None, copies_per_forward: int = 8, per_position: bool = False,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer head pos"]:
    """Attribution patching of every head (``node="z"``, ``"q"``: ``[layer, head]``) or KV head
    (``"k"``, ``"v"``: ``[layer, kv_head]``) in one backward pass.

    ``per_position=True`` keeps the sequence axis (``[layer, head, pos]``, positions of the
    padded target batch, summed over examples as the batch-mean metric weighs them): the
    estimate of patching the node at one position only; summed over ``pos`` it is the default
    result. Plain AtP and ``ig_steps`` only (the QK fix and GradDrop are per node).

    Plain AtP (the default) estimates ``patch_heads(..., node=node) - baseline`` and is exact
    where the metric is linear in the node. ``qk_fix=True`` recomputes the attention pattern
    exactly for q / k nodes (AtP*'s QK fix; z / v nodes are unchanged by it).
    ``grad_drop=True`` adds GradDrop: L gradients (each with one layer dropped) from
    ``copies_per_forward`` stacked copies per backward, combined as the mean over examples of
    ``sum_l |c_l(example)| / (L - 1)`` (Kramar et al.'s eq. 11) — a magnitude, for ranking.
    ``atp_star`` sets both.
    ``ig_steps=m`` integrates the gradient instead (as EAP-IG does for edges): the mean of the
    gradients of m runs whose decoder input embeddings lie on the straight line from the
    source's to the target's (k / m, k = 1..m), dotted with the same endpoint difference —
    for effects that only appear once the patch is large enough (a flat start, where the
    gradient at the target alone sees nothing; ``docs/causal.md``).
    """
    check_aligned(source, target)
    L, B = model.cfg.n_layers, len(target)
    n_out = n_nodes(model, node)
    names = [act_name(node, l) for l in range(L)]
    fixed = qk_fix and node in ("q", "k")
    if fixed:
        names = [act_name("pattern", l) for l in range(L)]
    drops: list[int | None] = list(range(L)) if grad_drop else [None]
    if per_position and (qk_fix or grad_drop):
        raise InputError("per_position works with plain AtP and ig_steps, not with qk_fix or "
                         "grad_drop (they score whole nodes)")
    if grad_drop and L < 2:
        raise InputError("GradDrop needs at least two layers (it averages over L - 1)")
    if ig_steps is not None:
        if qk_fix or grad_drop:
            raise InputError("ig_steps integrates plain AtP; it does not combine with qk_fix "
                             "or grad_drop")
        if int(ig_steps) < 1:
            raise InputError("ig_steps must be >= 1")
        return _integrated(model, source, target, metric, names, int(ig_steps),
                           copies_per_forward, per_position)

    # the patched quantity of every node: a_source - a_target, or pattern_patched - pattern
    if fixed:
        src_in: dict[int, Any] = {}
        with torch.no_grad(), attention_taps(model, src_in, range(L)):
            model(source)
    else:
        src = cache_activations(model, source, names)
    # per drop, example, layer, node: the example's term (the batch mean's 1/B inside)
    T = target.inputs["input_ids"].shape[1]
    estimates = torch.zeros(len(drops), B, L, n_out, *((T,) if per_position else ()))
    chunk = max(1, int(copies_per_forward))
    features: dict[str, Any] = {}
    for start in range(0, len(drops), chunk):
        part = drops[start:start + chunk]
        taps: dict[int, Any] | None = {} if fixed else None
        acts, grads = backward(model, target, metric, names, copies=len(part),
                                edits=grad_drop_edits(model, part, B), taps=taps,
                                features=features)
        for l, name in enumerate(names):
            g = grads[name].float().view(len(part), B, *grads[name].shape[1:])
            if fixed:
                inp = taps[l]  # copy 0 of the stacked run: every copy's forward is the same
                rep = inp.q.shape[1] // inp.k.shape[1]
                for i in range(n_out):  # only the heads the node feeds are recomputed
                    if node == "q":
                        q = inp.q[:B].clone()
                        q[:, i] = src_in[l].q[:, i]
                        heads = [i]
                        patched = patterns(inp, B, q=q, heads=heads)
                    else:
                        k = inp.k[:B].clone()
                        k[:, i] = src_in[l].k[:, i]
                        heads = list(range(i * rep, (i + 1) * rep))
                        patched = patterns(inp, B, k=k, heads=heads)
                    delta = patched - patterns(inp, B, heads=heads)
                    estimates[start:start + len(part), :, l, i] = torch.einsum(
                        "cbhqk,bhqk->cb", g[:, :, heads], delta).cpu()
            else:
                diff = (src[name] - acts[name][:B]).float()
                estimates[start:start + len(part), :, l] = torch.einsum(
                    "cbthd,bthd->cbht" if per_position else "cbthd,bthd->cbh", g, diff).cpu()
    if not grad_drop:
        return estimates[0].sum(0)
    # Kramar et al. eq. 11: mean over examples of sum_l |c_l(example)| / (L - 1)
    return estimates.abs().sum(dim=(0, 1)) / (L - 1)


def _integrated(model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
                names: list[str], m: int, per_forward: int, per_position: bool = False) -> Tensor:
    warn_side_inputs(model, "ig_steps")
    B, emb = len(target), EMBED
    src = cache_activations(model, source, [emb, *names])
    tgt = cache_activations(model, target, names)
    alphas = [k / m for k in range(1, m + 1)]
    T = target.inputs["input_ids"].shape[1]
    total = torch.zeros(len(names), n_nodes(model, names[0].rsplit("_", 1)[1]),
                        *((T,) if per_position else ()))
    per_forward = max(1, int(per_forward))
    features: dict[str, Any] = {}
    for start in range(0, m, per_forward):
        part = alphas[start:start + per_forward]
        _, grads = backward(model, target, metric, names, copies=len(part),
                             edits=[interpolate(src[emb], part, B)], features=features)
        for l, name in enumerate(names):
            g = grads[name].float().view(len(part), B, *grads[name].shape[1:])
            total[l] += torch.einsum("cbthd,bthd->ht" if per_position else "cbthd,bthd->h", g,
                                     (src[name] - tgt[name]).float()).cpu()
    return total / m


def atp_star(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, node: Node = "z", grad_drop: bool = True, copies_per_forward: int = 8,
) -> Float[Tensor, "layer head"]:
    """AtP* (Kramar et al. 2024): AtP with the QK fix and, by default, GradDrop (then the
    result is a non-negative magnitude; ``grad_drop=False`` keeps the signed QK-fixed
    estimate)."""
    return attribute_heads(model, source, target, metric, node=node, qk_fix=True,
                           grad_drop=grad_drop, copies_per_forward=copies_per_forward)
