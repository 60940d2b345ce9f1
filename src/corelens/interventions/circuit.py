"""Circuits over edges: run the model with only some edges carrying the clean activations, score
a ranked edge list by its faithfulness curve (MIB's CPR / CMD), and discover a circuit by ACDC.

The graph is EAP's (``corelens.interventions.attribution.edges``): senders are the decoder's
input embeddings (text AND vision tokens), every head's output ``z_h W_O_h`` and every MLP's
output; receivers are each query head's q input, each KV head's k and v inputs, each MLP's
input and the logits. In a pre-norm decoder the input of a receiver is the sum of its upstream
senders' outputs (plus biases, the same in every run), so ablating edge s -> r means: the input
of r is its input in this run minus ``out_s - out_s^ablated``, for r alone. ``run_circuit`` does
that in one forward of the clean batch (one stacked copy per circuit): it records every sender's
output as the run goes and rewrites each receiver's input right before its projection
(``hook_q`` / ``hook_k`` / ``hook_v`` recomputed per head from its own residual, the MLP's norm
input, the final norm input). The image is in every forward.

Ablations (what an ablated sender sends; MIB's interventions): ``"patching"`` its output in the
paired corrupted run (a counterfactual), ``"mean"`` its mean output over the real tokens of a
reference batch (the corrupted batch unless given), ``"zero"`` nothing.

Faithfulness of a circuit C (MIB, Mueller et al. 2025): ``(m(C) - m(empty)) / (m(full) -
m(empty))`` with m the mean metric over the evaluation examples, ``m(full)`` the clean run and
``m(empty)`` the circuit with no edge. For a ranked edge list, circuits of the top ``k`` of the
edges by |score| for k in MIB's fractions (0.1% ... 100%); CPR is the area under the curve and
CMD the area between the curve and 1 (trapezoids over the fractions, as MIB's
``evaluate_area_under_curve``: higher CPR, CMD nearer 0 is better). Measure on examples other
than those the ranking was computed on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.core.evaluate import logits_to_keep
from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.heads import head_name, kv_head_name
from corelens.hook_names import EMBED, FINAL_NORM_IN, act_name
from corelens.interventions.attribution.common import warn_side_inputs
from corelens.interventions.attribution.edges import (
    EdgeScores,
    Graph,
    check_eap_supported,
    decoder_blocks,
    projection_weight,
)
from corelens.interventions.core import (
    Metric,
    cache_activations,
    check_aligned,
    image_features,
)
from corelens.interventions.core import stacked as stacked_copies

Ablation = Literal["patching", "mean", "zero"]
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# --- ablated sender outputs -------------------------------------------------------------------
@dataclass
class AblatedSenders:
    """What each sender sends when its edge is ablated: the embeddings ``[B, t, d]``, each
    layer's ``z`` ``[B, t, H, d_head]`` and MLP output ``[B, t, d]`` (or broadcastable means)."""

    embed: Tensor
    z: list[Tensor]
    mlp: list[Tensor]

    @classmethod
    def build(cls, model: Any, target: MultimodalBatch, ablation: Ablation,
              corrupted: MultimodalBatch | None = None,
              reference: MultimodalBatch | None = None) -> "AblatedSenders":
        L = model.cfg.n_layers
        names = [EMBED] + [act_name("z", l) for l in range(L)] + [
            act_name("mlp_out", l) for l in range(L)]
        if ablation == "patching":
            if corrupted is None:
                raise InputError("ablation='patching' needs the corrupted batch")
            check_aligned(corrupted, target)
            acts = cache_activations(model, corrupted, names)
        elif ablation == "mean":
            ref = reference if reference is not None else corrupted
            if ref is None:
                raise InputError("ablation='mean' needs a reference batch (or the corrupted one)")
            cache = cache_activations(model, ref, names)
            real = ref.attention_mask.bool().to(cache[EMBED].device)
            acts = {n: a[real].mean(0)[None, None] for n, a in cache.items()}
        elif ablation == "zero":
            acts = {n: torch.zeros(()) for n in names}
        else:
            raise InputError(f"ablation must be 'patching', 'mean' or 'zero', not {ablation!r}")
        return cls(acts[EMBED], [acts[act_name("z", l)] for l in range(L)],
                   [acts[act_name("mlp_out", l)] for l in range(L)])


# --- the circuit forward ----------------------------------------------------------------------
def _bias(linear: Any) -> Tensor | None:
    b = getattr(getattr(linear, "original_component", linear), "bias", None)
    return b if isinstance(b, Tensor) else None


def _repeat(x: Tensor, c: int) -> Tensor:
    """A target-batch tensor for ``c`` stacked copies (copy-major); broadcastable ones as is."""
    return x if x.ndim == 0 or x.shape[0] == 1 else torch.cat([x] * c)


def run_circuit(
    model: Any, target: MultimodalBatch, keep: Bool[Tensor, "circuit sender receiver"],
    ablated: AblatedSenders, metric: Metric, *, graph: Graph | None = None,
    features: Any | None = None,
) -> Float[Tensor, "circuit batch"]:
    """The metric of the target run with only the edges of each circuit kept (``keep[c]``, a
    ``[sender, receiver]`` mask over ``graph``; the others ablated), all circuits in one forward
    as stacked copies that reuse the target's image ``features`` (``image_features``)."""
    graph = graph or Graph.of(model)
    check_eap_supported(model)
    if keep.ndim == 2:
        keep = keep[None]
    C, B = keep.shape[0], len(target)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    cut = graph.exists & ~keep.to(torch.bool).cpu()  # [C, S, R]: the ablated edges
    r_index = {r: j for j, r in enumerate(graph.receivers)}
    blocks = decoder_blocks(model)
    big, extra = stacked_copies(model, target, C, features)
    diffs: dict[int, Tensor] = {}  # sender -> this run's output minus the ablated one [CB,t,d]
    resid: dict[int, Tensor] = {}

    def removed(receivers: list[str]) -> Tensor | None:
        """The ablated senders' differences summed per receiver, [n, C*B, t, d] (None: no edge
        into these receivers is ablated in any circuit)."""
        cols = [r_index[r] for r in receivers]
        senders = sorted(diffs)
        w = cut[:, senders][:, :, cols]  # [C, S', n]
        if not bool(w.any()):
            return None
        d = torch.stack([diffs[s] for s in senders])  # [S', CB, t, d]
        d = d.view(len(senders), C, B, *d.shape[2:])
        out = torch.einsum("csr,scbtd->rcbtd", w.to(d.device, d.dtype), d)
        return out.reshape(len(cols), C * B, *d.shape[3:])

    def record(sender: int, ablated_act: Tensor) -> Callable:
        def hook(x: Tensor, hook: Any) -> Tensor:
            diffs[sender] = (x - _repeat(ablated_act.to(x.device, x.dtype), C)).float()
            return x
        return hook

    def record_resid(layer: int) -> Callable:
        def hook(x: Tensor, hook: Any) -> Tensor:
            resid[layer] = x
            return x
        return hook

    def record_heads(layer: int) -> Callable:
        w_o = projection_weight(blocks[layer].attn.o, 1, "W_O")[0]  # [d_model, H * d_head]

        def hook(z: Tensor, hook: Any) -> Tensor:
            delta = (z - _repeat(ablated.z[layer].to(z.device, z.dtype), C)).float()
            w = w_o.to(z.device).float().view(w_o.shape[0], H, -1)
            for h, out in enumerate(torch.einsum("bthk,dhk->hbtd", delta, w).unbind(0)):
                diffs[1 + layer * H + h] = out
            return z
        return hook

    def rewrite_heads(layer: int, kind: str) -> Callable:
        block = blocks[layer]
        linear = getattr(block.attn, kind)
        ln1 = getattr(block.ln1, "original_component", block.ln1)
        name = head_name if kind == "q" else kv_head_name

        def hook(x: Tensor, hook: Any) -> Tensor:  # [CB, t, n, d_head]
            n = x.shape[2]
            minus = removed([f"{name((layer, i))}.{kind}" for i in range(n)])
            if minus is None:
                return x
            w = projection_weight(linear, n, f"W_{kind.upper()}").to(x.device)
            inputs = ln1((resid[layer][None].float() - minus).to(resid[layer].dtype))
            new = torch.einsum("nbtd,nkd->btnk", inputs.float(), w)
            bias = _bias(linear)
            if bias is not None:
                new = new + bias.float().view(n, -1).to(new.device)
            return new.to(x.dtype)
        return hook

    def rewrite_input(receiver: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> Tensor:
            minus = removed([receiver])
            return x if minus is None else (x.float() - minus[0]).to(x.dtype)
        return hook

    hooks: list[tuple[str, Callable]] = [(EMBED, record(0, ablated.embed))]
    for l in range(L):
        hooks.append((act_name("resid_pre", l), record_resid(l)))
        hooks += [(act_name(kind, l), rewrite_heads(l, kind)) for kind in ("q", "k", "v")]
        hooks.append((act_name("z", l), record_heads(l)))
        hooks.append((act_name("ln2_in", l), rewrite_input(f"MLP{l}")))
        hooks.append((act_name("mlp_out", l), record(1 + L * H + l, ablated.mlp[l])))
    hooks.append((FINAL_NORM_IN, rewrite_input("logits")))
    with torch.no_grad():
        logits = model.run_with_hooks(big, fwd_hooks=hooks,
                                      logits_to_keep=logits_to_keep(metric, big), **extra)
    return metric(logits, big).float().view(C, B).cpu()


# --- faithfulness -----------------------------------------------------------------------------
@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-``fractions`` circuits of a ranked edge list (MIB)."""

    fractions: list[float]
    n_edges: list[int]  # edges kept at each fraction (int(fraction * total), as MIB)
    metric: list[float]  # mean metric of each circuit
    faithfulness: list[float]
    full: float  # m(full): the clean run
    empty: float  # m(empty): no edge kept
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cpr(self) -> float:
        """Area under the faithfulness curve (higher is better)."""
        return area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        """Area between the curve and 1 (0 is best)."""
        return area(self.fractions, [abs(1.0 - f) for f in self.faithfulness])

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "fractions": self.fractions, "n_edges": self.n_edges,
                "metric": self.metric, "faithfulness": self.faithfulness, "full": self.full,
                "empty": self.empty, "cpr": self.cpr, "cmd": self.cmd, "meta": self.meta}


def area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoidal area under ``ys`` over ``xs`` (MIB's ``evaluate_area_under_curve``)."""
    return float(sum((x2 - x1) * (y1 + y2) / 2
                     for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:])))


def faithfulness(m: float, full: float, empty: float) -> float:
    if full == empty:
        raise InputError("the clean run and the empty circuit score the same: faithfulness is "
                         "undefined (is the corrupted input really different?)")
    return (m - empty) / (full - empty)


def circuit_metrics(model: Any, target: MultimodalBatch, keep: Tensor, ablated: AblatedSenders,
                    metric: Metric, *, graph: Graph, per_forward: int = 4,
                    progress: bool = False, desc: str = "circuits") -> Float[Tensor, " circuit"]:
    """Mean metric over the batch of each circuit of ``keep`` ([circuit, sender, receiver]),
    ``per_forward`` circuits per forward."""
    features = image_features(model, target) if per_forward > 1 and len(keep) > 1 else None
    out = []
    for start in tqdm(range(0, len(keep), per_forward), disable=not progress, desc=desc):
        out.append(run_circuit(model, target, keep[start:start + per_forward], ablated, metric,
                               graph=graph, features=features).mean(1))
    return torch.cat(out)


def faithfulness_curve(
    model: Any, clean: MultimodalBatch | Sequence[MultimodalBatch],
    corrupted: MultimodalBatch | Sequence[MultimodalBatch], scores: EdgeScores, metric: Metric,
    *, ablation: Ablation = "patching", reference: MultimodalBatch | None = None,
    fractions: Sequence[float] = MIB_FRACTIONS, per_forward: int = 4, progress: bool = False,
) -> FaithfulnessCurve:
    """The faithfulness curve of ``scores``'s ranking on (clean, corrupted) pairs (one batch
    each, or lists of aligned batches; means weigh every example alike): the top
    ``int(f * n_edges)`` edges by |score| for each fraction f, the rest ablated
    (``ablation``; "mean" averages over ``reference`` or each corrupted batch), the metric on
    the clean batch. Compute the scores on other examples (a discovery split)."""
    graph = Graph.of(model)
    graph.check_scores(scores)
    warn_side_inputs(model, "faithfulness")
    fractions = [float(f) for f in fractions]
    if any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise InputError(f"fractions must rise within [0, 1], got {fractions}")
    cleans = [clean] if isinstance(clean, MultimodalBatch) else list(clean)
    corrupts = [corrupted] if isinstance(corrupted, MultimodalBatch) else list(corrupted)
    if len(cleans) != len(corrupts) or not cleans:
        raise InputError("give as many corrupted batches as clean ones (at least one)")
    edges = scores.edges()
    counts = [int(f * graph.n_edges) for f in fractions]
    keep = torch.stack([torch.zeros_like(graph.exists)]
                       + [graph.mask(edges[:n]) for n in counts])
    total = torch.zeros(len(keep) + 1)  # the circuits, then the clean run (same arithmetic)
    n = 0
    for c, x in zip(cleans, corrupts):
        ablated = AblatedSenders.build(model, c, ablation, x, reference)
        got = circuit_metrics(model, c, keep, ablated, metric, graph=graph,
                              per_forward=per_forward, progress=progress, desc="faithfulness")
        with torch.no_grad():
            logits = model(c, logits_to_keep=logits_to_keep(metric, c))
        clean_mean = metric(logits, c).float().mean().cpu()
        total += torch.cat([got, clean_mean[None]]) * len(c)
        n += len(c)
    values = (total / n).tolist()
    empty, metrics, full = values[0], values[1:-1], values[-1]
    return FaithfulnessCurve(fractions, counts, metrics,
                             [faithfulness(m, full, empty) for m in metrics], full, empty,
                             scores.method, {"ablation": ablation,
                                             "n_graph_edges": graph.n_edges, "n_examples": n})


# --- edge patching ----------------------------------------------------------------------------
def edge_patching(
    model: Any, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric, *,
    ablation: Ablation = "patching", reference: MultimodalBatch | None = None,
    per_forward: int = 16, progress: bool = False,
) -> EdgeScores:
    """Exact edge patching: each edge ablated alone (every other edge clean), one stacked copy
    per edge; score = m(clean) - m(without the edge), what the edge contributes (the exact
    quantity EAP estimates to first order, up to sign convention: EAP scores the change when
    the edge carries the corrupted activation, so ``-EAP`` approximates this)."""
    graph = Graph.of(model)
    warn_side_inputs(model, "edge patching")
    ablated = AblatedSenders.build(model, clean, ablation, corrupted, reference)
    edges = graph.exists.nonzero().tolist()
    keep = graph.exists.expand(len(edges), *graph.exists.shape).clone()
    for c, (s, r) in enumerate(edges):
        keep[c, s, r] = False
    values = circuit_metrics(model, clean, keep, ablated, metric, graph=graph,
                             per_forward=per_forward, progress=progress, desc="edge patching")
    with torch.no_grad():
        logits = model(clean, logits_to_keep=logits_to_keep(metric, clean))
    full = float(metric(logits, clean).float().mean())
    scores = torch.full(graph.exists.shape, math.nan)
    for (s, r), v in zip(edges, values.tolist()):
        scores[s, r] = full - v
    return EdgeScores(graph.senders, graph.receivers, scores, "exact",
                      {"ablation": ablation, "n_examples": len(clean), "full": full})


# --- ACDC -------------------------------------------------------------------------------------
def acdc(
    model: Any, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric, *,
    threshold: float, ablation: Ablation = "patching", reference: MultimodalBatch | None = None,
    progress: bool = False,
) -> EdgeScores:
    """ACDC (Conmy et al. 2023) over the edge graph: visit the receivers from the logits back
    to the first layer (for each, its incoming edges from the latest sender back to the
    embeddings), remove an edge for good when the mean metric of the circuit moves by less than
    ``threshold`` without it (one forward per edge, the image in each). Returns ``EdgeScores``:
    a kept edge scores minus the metric change its removal would have caused (|score| >=
    threshold), a removed one 0; ``.circuit(threshold=threshold)`` is the circuit (``meta``:
    its size and metric)."""
    graph = Graph.of(model)
    warn_side_inputs(model, "ACDC")
    if threshold < 0:
        raise InputError("threshold must be >= 0")
    ablated = AblatedSenders.build(model, clean, ablation, corrupted, reference)
    features = image_features(model, clean)
    keep = graph.exists.clone()
    scores = torch.full(graph.exists.shape, math.nan)
    current = float(run_circuit(model, clean, keep, ablated, metric, graph=graph,
                                features=features).mean())
    order = [(s, r) for r in reversed(range(len(graph.receivers)))
             for s in reversed(range(len(graph.senders))) if graph.exists[s, r]]
    for s, r in tqdm(order, disable=not progress, desc="ACDC"):
        trial = keep.clone()
        trial[s, r] = False
        m = float(run_circuit(model, clean, trial, ablated, metric, graph=graph,
                              features=features).mean())
        change = m - current
        if abs(change) < threshold:
            keep, current = trial, m
            scores[s, r] = 0.0
        else:
            scores[s, r] = -change  # what the edge contributes
    return EdgeScores(graph.senders, graph.receivers, scores, "acdc",
                      {"threshold": threshold, "ablation": ablation, "n_examples": len(clean),
                       "kept": int(keep.sum()), "metric": current})
