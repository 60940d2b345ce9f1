"""Patching and attribution over a dataset of pairs: batch by batch on the runner (resumable from
a partial file, data-parallel under ``torchrun``), averaged over every pair.

``patch_pairs(model, clean, corrupted, method=...)`` cuts the pairs into batches of
``batch_size`` (the units of ``runner.run_units``), runs one method per batch
(``patch_heads``, ``attribute_heads``, ``atp_star`` or ``edge_attribution``) with the logit
difference clean answer - corrupted answer (``ContrastPair.logit_diff``), and merges the
per-batch means weighted by batch size, in batch order: the same floats on one process and on
any number of ranks. What ``corelens patch`` runs.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch

from corelens.core.evaluate import metric_value
from corelens.errors import InputError
from corelens.interventions.attribution import atp_star, attribute_heads, edge_attribution
from corelens.interventions.attribution.edges import EdgeScores
from corelens.interventions.patching import patch_heads, prepare_pair
from corelens.runner import run_units

Method = Literal["exact", "atp", "atp*", "eap", "eap-ig"]
METHODS = ("exact", "atp", "atp*", "eap", "eap-ig")


def batch_record(model: Any, clean: Sequence[Any], corrupted: Sequence[Any], method: str,
                 direction: str, node: str, steps: int, heads_per_forward: int
                 ) -> dict[str, Any]:
    """One batch of pairs: the metric's baseline (the unpatched target run) and the method's
    scores, each a mean over the batch; JSON-able."""
    pair = prepare_pair(model, clean, corrupted)
    source, target = pair.source_target(direction)  # type: ignore[arg-type]
    metric = pair.logit_diff
    rec: dict[str, Any] = {"n": len(clean), "baseline": metric_value(model, target, metric)}
    if method == "exact":
        rec["scores"] = patch_heads(model, source, target, metric, node=node,  # type: ignore
                                    heads_per_forward=heads_per_forward).tolist()
    elif method in ("atp", "atp*"):
        fn = atp_star if method == "atp*" else attribute_heads
        rec["scores"] = fn(model, source, target, metric, node=node).tolist()  # type: ignore
    else:
        edges = edge_attribution(model, source, target, metric, method=method,  # type: ignore
                                 steps=steps)
        rec["edges"] = edges.to_dict()
    return rec


def _weighted_mean(values: list[torch.Tensor], weights: list[int]) -> torch.Tensor:
    total = sum(weights)
    out = torch.zeros_like(values[0], dtype=torch.float64)
    for v, w in zip(values, weights):  # in batch order: the same floats on any world size
        out += v.double() * (w / total)
    return out.float()


def patch_pairs(
    model: Any, clean: Sequence[Any], corrupted: Sequence[Any], *, method: Method = "exact",
    direction: Literal["denoise", "noise"] = "denoise", node: str = "z", steps: int = 5,
    batch_size: int = 8, heads_per_forward: int = 8, partial: str | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Every head's (or edge's) effect on the logit difference, averaged over all pairs (see the
    module doc). Returns ``{"method", "direction", "node", "n_pairs", "batch_size",
    "baseline", "scores" ([layer, head] for head methods) or "edges" (``EdgeScores``)}`` on
    rank 0, None on the other ranks of a ``torchrun`` group.

    ``exact``: the patched metric (``patch_heads``; subtract ``baseline`` for the effect);
    ``atp`` / ``atp*``: attribution estimates of the effect; ``eap`` / ``eap-ig``: edge scores.
    ``partial``: the runner's partial file (resume after an interruption)."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, not {method!r}")
    clean, corrupted = list(clean), list(corrupted)
    if len(clean) != len(corrupted) or not clean:
        raise InputError(f"got {len(clean)} clean and {len(corrupted)} corrupted examples: "
                         "pass one corrupted partner per clean example (and at least one)")
    n_batches = math.ceil(len(clean) / batch_size)
    recs = run_units(
        range(n_batches),
        lambda b: batch_record(model, clean[b * batch_size:(b + 1) * batch_size],
                               corrupted[b * batch_size:(b + 1) * batch_size], method,
                               direction, node, steps, heads_per_forward),
        partial=partial, desc=f"patching ({method})", progress=progress,
        run={"method": method, "direction": direction, "node": node, "steps": steps,
             "batch_size": batch_size, "n_pairs": len(clean)})
    if recs is None:
        return None
    ordered = [recs[b] for b in range(n_batches)]
    weights = [r["n"] for r in ordered]
    out: dict[str, Any] = {
        "method": method, "direction": direction, "node": node, "n_pairs": len(clean),
        "batch_size": batch_size,
        "baseline": float(_weighted_mean([torch.tensor(r["baseline"]) for r in ordered],
                                         weights))}
    if method in ("eap", "eap-ig"):
        parts = [EdgeScores.from_dict(r["edges"]) for r in ordered]
        scores = _weighted_mean([p.scores for p in parts], weights)
        first = parts[0]
        out["edges"] = EdgeScores(first.senders, first.receivers, scores, first.method,
                                  first.meta)
    else:
        out["scores"] = _weighted_mean([torch.tensor(r["scores"]) for r in ordered], weights)
    return out
