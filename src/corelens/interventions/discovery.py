"""Circuit discovery held out: rank edges on a discovery split with any method, score the
ranking on a separate evaluation split by its faithfulness curve (CPR / CMD), and, where the
circuit is known, by recovery of its edges.

Methods (``METHODS``): ``exact`` (``circuit.edge_patching``: each edge ablated alone),
``eap`` / ``eap-ig`` (``attribution.edge_attribution`` with the corrupted run as source and the
clean one as target, MIB's convention), ``acdc`` (``circuit.acdc``; its threshold is a fraction
of the clean - corrupted gap of the discovery split; removed edges rank last), and ``random``
(a seeded random ranking: the floor every method must clear).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.interventions.attribution.edges import EdgeScores, Graph, edge_attribution
from corelens.interventions.circuit import (
    MIB_FRACTIONS,
    Ablation,
    FaithfulnessCurve,
    acdc,
    edge_patching,
    faithfulness_curve,
)
from corelens.interventions.core import Metric
from corelens.interventions.patching import prepare_pair

METHODS = ("exact", "eap", "eap-ig", "acdc", "random")


def discover(model: Any, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric,
             method: str, *, steps: int = 5, acdc_threshold: float = 0.02,
             ablation: Ablation = "patching", seed: int = 0,
             progress: bool = False) -> EdgeScores:
    """Edge scores of ``method`` (``METHODS``) on one (clean, corrupted) batch pair."""
    if method == "exact":
        return edge_patching(model, clean, corrupted, metric, ablation=ablation,
                             progress=progress)
    if method in ("eap", "eap-ig"):
        return edge_attribution(model, corrupted, clean, metric, method=method, steps=steps,
                                progress=progress)
    if method == "acdc":
        with torch.no_grad():
            gap = float((metric(model(clean), clean) - metric(model(corrupted), corrupted))
                        .float().mean())
        return acdc(model, clean, corrupted, metric, threshold=acdc_threshold * abs(gap),
                    ablation=ablation, progress=progress)
    if method == "random":
        graph = Graph.of(model)
        g = torch.Generator().manual_seed(seed)
        scores = torch.where(graph.exists, torch.rand(graph.exists.shape, generator=g),
                             torch.tensor(float("nan")))
        return EdgeScores(graph.senders, graph.receivers, scores, "random", {"seed": seed})
    raise InputError(f"unknown method {method!r}: choose from {METHODS}")


def recovery(scores: EdgeScores, known: set[tuple[str, str]]) -> dict[str, float]:
    """Precision and recall of the top-|known| edges of ``scores`` against ``known``."""
    if not known:
        raise InputError("no known edges")
    top = {(s, r) for s, r, _ in scores.top(len(known))}
    hit = len(top & known)
    return {"precision": hit / len(top), "recall": hit / len(known), "n_known": len(known)}


@dataclass
class MethodResult:
    method: str
    curve: FaithfulnessCurve
    seconds: float
    recovery: dict[str, float] | None = None
    scores: EdgeScores | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "cpr": self.curve.cpr, "cmd": self.curve.cmd,
                "seconds": self.seconds, "curve": self.curve.to_dict(),
                "recovery": self.recovery}


@dataclass
class CircuitBenchmark:
    """Per method: its faithfulness curve on the evaluation split (CPR / CMD), time to rank,
    recovery of the known edges; the two splits as indices into the given pairs."""

    discovery: list[int]
    evaluation: list[int]
    results: list[MethodResult] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"discovery": self.discovery, "evaluation": self.evaluation,
                "results": [r.to_dict() for r in self.results], "meta": self.meta}

    def table(self) -> str:
        """One line per method: CPR, CMD, seconds (and recall / precision at the known size)."""
        known = any(r.recovery for r in self.results)
        head = f"{'method':<8} {'CPR':>7} {'CMD':>7} {'seconds':>8}"
        lines = [head + (f" {'recall':>7} {'precision':>9}" if known else "")]
        for r in self.results:
            line = f"{r.method:<8} {r.curve.cpr:7.3f} {r.curve.cmd:7.3f} {r.seconds:8.1f}"
            if r.recovery:
                line += f" {r.recovery['recall']:7.2f} {r.recovery['precision']:9.2f}"
            lines.append(line)
        return "\n".join(lines)


def split_pairs(n: int, discovery_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` pairs into discovery and evaluation indices (both non-empty)."""
    if n < 2 or not 0 < discovery_fraction < 1:
        raise InputError("need at least 2 pairs and 0 < discovery_fraction < 1")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(discovery_fraction * n)))
    return sorted(order[:k]), sorted(order[k:])


def circuit_benchmark(
    model: Any, pairs: Sequence[tuple[Any, Any]], methods: Sequence[str] = METHODS, *,
    discovery_fraction: float = 0.5, seed: int = 0, ablation: Ablation = "patching",
    fractions: Sequence[float] = MIB_FRACTIONS, steps: int = 5, acdc_threshold: float = 0.02,
    known: set[tuple[str, str]] | None = None, progress: bool = False,
) -> CircuitBenchmark:
    """Rank edges with each method on the discovery pairs, score the rankings on the evaluation
    pairs (``GroundedExample`` (clean, corrupted) pairs with matching layouts; the metric is
    logit(clean answer) - logit(corrupted answer))."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown method(s) {bad}: choose from {METHODS}")
    disc, held = split_pairs(len(pairs), discovery_fraction, seed)
    d = prepare_pair(model, [pairs[i][0] for i in disc], [pairs[i][1] for i in disc])
    e = prepare_pair(model, [pairs[i][0] for i in held], [pairs[i][1] for i in held])
    out = CircuitBenchmark(disc, held, meta={"ablation": ablation, "seed": seed,
                                             "discovery_fraction": discovery_fraction,
                                             "steps": steps, "acdc_threshold": acdc_threshold,
                                             "n_graph_edges": Graph.of(model).n_edges})
    for method in tqdm(methods, disable=not progress, desc="methods"):
        t0 = time.perf_counter()
        scores = discover(model, d.clean, d.corrupted, d.logit_diff, method, steps=steps,
                          acdc_threshold=acdc_threshold, ablation=ablation, seed=seed)
        seconds = time.perf_counter() - t0
        curve = faithfulness_curve(model, e.clean, e.corrupted, scores, e.logit_diff,
                                   ablation=ablation, fractions=fractions)
        out.results.append(MethodResult(method, curve, seconds,
                                        recovery(scores, known) if known else None, scores))
    return out
