"""Retrieval Attention Mass (RAM) and its companions, as a hook metric and as ``score_heads``.

For example e, layer l, query head h and softmax attention A (DESIGN.md, "RAM, defined"):

    RAM(e, l, h) = mean over q in Q_e of  sum over k in R_e of A[q, k]

Q_e: the positions predicting the answer tokens (teacher forcing; ``query="answer"``) or the
last prompt position (``query="last_prompt"``). V_e: the image-feature tokens of every image and
view, delimiters excluded. R_e: the vision tokens whose box overlaps an evidence box by >= tau
of the token's area (largest overlap if none reaches tau). The regions are built in
``corelens.scores.regions``; every score of the same pass -- visual mass, relative RAM, lift,
distractor mass and selectivity, sink and high-norm mass, Wu et al.'s retrieval score, spatial
entropies, value-weighted RAM -- is one registered function of ``corelens.scores.registry``.

The attention rows come from the attention backend's taps (``AttentionInputs.pattern_rows``):
rows for Q_e only, against all keys, so the forward keeps SDPA and memory stays O(|Q| T).

Aggregation over examples: mean-type scores are means of per-example values, kept per example;
ratio scores are ratios of sums over examples, and a head whose mean visual mass is below
``mass_floor`` gets NaN for them, so that noise cannot top a ranking.

``score_all`` runs on ``corelens.runner``: resumable from its partial file, and data-parallel
under ``torchrun`` with the same result as one process (docs/scaling.md). It returns one
``HeadScores`` per registered score, each ``Float[Tensor, "layer head"]``.

Example:
    ```python
    from corelens import zoo
    from corelens.scores.ram import RamParams, score_all

    model = zoo.load("toy-llava")
    examples = zoo.examples("toy-llava", 16, seed=0)
    scores = score_all(model, examples, params=RamParams(tau=0.5), progress=False)
    scores["ram"].scores.shape  # [layer, head]: [4, 4]
    scores["ram"].top(frac=0.05), scores["selectivity"].top(k=3)  # CoRe heads; by selectivity
    ```
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.core.attention import AttentionInputs
from corelens.data.batch import MultimodalBatch
from corelens.hook_names import act_name
from corelens.runner import run_units
from corelens.scores.head_scores import HeadScores
from corelens.scores.regions import ExampleRegions, RamParams, example_regions, key_weights
from corelens.scores.registry import (
    SCORES,
    ScoreInputs,
    kang_spatial_entropy,
    names,
    per_query_scores,
)

# the score names of each kind (historical names: a "metric" here is a score name)
MEAN_METRICS = names("mean")
RATIO_METRICS = names("ratio")


def masses(
    rows: Float[Tensor, "head q key"],
    reg: ExampleRegions,
    key_weight: Float[Tensor, "head key"] | None = None,
    exclude_sink: bool = False,
    high_norm: Tensor | None = None,
) -> dict[str, Float[Tensor, "head q"]]:
    """Per head and query row: every mean score of the registry, from attention rows.

    ``high_norm``: high-norm vision tokens (reported as ``high_norm_mass``; with
    ``exclude_sink`` removed with the first-token sink and the rows renormalised)."""
    raw = rows.float()
    rows = raw
    if exclude_sink:
        rows = raw.clone()
        rows[..., reg.sink] = 0
        if high_norm is not None:
            rows[..., high_norm.to(rows.device)] = 0
        rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)
    return per_query_scores(ScoreInputs(rows, raw, reg, key_weight, high_norm))


class RamMetric:
    """A hook metric: attach it to a forward and it records every registered score for every
    layer and head (an ``Intervention`` that only reads).

    ``token_level[e][name]`` keeps one value per query token, ``Float[Tensor, "layer head q"]``;
    ``example_level()`` the mean over them, ``Float[Tensor, "example layer head"]``.

    Example:
        ```python
        from corelens import zoo
        from corelens.scores.ram import RamMetric

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))
        metric = RamMetric(model)
        with metric.attach(batch):
            model(batch)  # any forward of this batch: hooks, patching, your own code
        metric.token_level[0]["ram"].shape  # [layer, head, q] for example 0
        metric.example_level()["ram"].shape  # [example, layer, head]
        ```
    """

    def __init__(self, model: Any, params: RamParams | None = None) -> None:
        self.model = model
        self.params = params or RamParams()
        self.token_level: list[dict[str, Tensor]] = []
        self.regions: list[ExampleRegions] = []

    @contextlib.contextmanager
    def attach(self, batch: MultimodalBatch) -> Iterator["RamMetric"]:
        self.regions = example_regions(batch, self.params)
        n_layers = self.model.cfg.n_layers
        per_layer: list[list[dict[str, Tensor]] | None] = [None] * n_layers
        width = max(len(r.queries) for r in self.regions)
        rows_idx = torch.stack([
            torch.cat([r.queries, r.queries[-1:].repeat(width - len(r.queries))])
            for r in self.regions])

        norms: dict[int, Tensor] = {}

        def keep_norm(resid: Tensor, hook: Any) -> None:
            norms[int(hook.name.split(".")[1])] = resid.detach().float().norm(dim=-1).cpu()

        def tap(inputs: AttentionInputs) -> None:
            if inputs.q.shape[2] != batch.seq_len:
                return  # a cached decoding step: not this batch's prefill
            with torch.no_grad():
                rows = inputs.pattern_rows(rows_idx.to(inputs.q.device), torch.float32)
                weight = (key_weights(self.model, inputs) if self.params.value_weighted
                          else None)
                per_layer[inputs.layer] = [
                    masses(rows[e, :, : len(reg.queries)], reg,
                           None if weight is None else weight[e], self.params.exclude_sink,
                           self._high_norm(norms.get(inputs.layer), e, reg))
                    for e, reg in enumerate(self.regions)]

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.model.hooks(fwd_hooks=[
                # ln1's input: after any edit at hook_resid_pre, what the attention reads
                (act_name("ln1_in", layer), keep_norm) for layer in range(n_layers)]))
            for layer in range(n_layers):
                stack.enter_context(self.model.attention.tap(layer, tap))
            yield self
        if any(p is None for p in per_layer):
            raise RuntimeError("RamMetric: the forward inside attach() did not run every layer "
                               "on this batch")
        self.token_level = [
            {name: torch.stack([per_layer[l][e][name]  # type: ignore[index]
                                for l in range(n_layers)]).cpu()
             for name in per_layer[0][e]}  # type: ignore[index]
            for e in range(len(self.regions))]

    def _high_norm(self, norms: Tensor | None, e: int, reg: ExampleRegions) -> Tensor | None:
        """Vision tokens whose layer-input norm is an outlier (massive activations / sinks)."""
        if norms is None or not len(reg.vision):
            return None
        n = norms[e, reg.vision]
        return reg.vision[n > self.params.high_norm_factor * n.median()]

    def generate(self, batch: MultimodalBatch, max_new_tokens: int = 10,
                 **kw: Any) -> list[str]:
        """Generate from ``batch`` and record, for each generated token (each decoding step's
        query), every score against the batch's regions: ``token_level[e][name]`` is
        [layer, head, step] (step 0 = the token predicted by the last prompt position)."""
        self.regions = example_regions(batch, self.params)
        n_layers = self.model.cfg.n_layers
        steps: list[list[list[dict[str, Tensor]]]] = [[] for _ in range(n_layers)]
        last = torch.tensor([int(r.queries[0]) for r in self.regions])[:, None]

        def tap(inputs: AttentionInputs) -> None:
            tq = inputs.q.shape[2]
            with torch.no_grad():
                if tq == batch.seq_len:  # prefill: the last prompt position's row
                    rows = inputs.pattern_rows(
                        torch.full_like(last, batch.seq_len - 1).to(inputs.q.device),
                        torch.float32)
                elif tq == 1:
                    rows = inputs.pattern_rows(torch.zeros_like(last).to(inputs.q.device),
                                               torch.float32)
                else:
                    return
                steps[inputs.layer].append([
                    masses(rows[e], reg, None, self.params.exclude_sink)
                    for e, reg in enumerate(self.regions)])

        with contextlib.ExitStack() as stack:
            for layer in range(n_layers):
                stack.enter_context(self.model.attention.tap(layer, tap))
            texts = self.model.generate(batch, max_new_tokens=max_new_tokens, **kw)
        n_steps = min(len(s) for s in steps)
        self.token_level = [
            {name: torch.stack([torch.cat([steps[l][t][e][name] for t in range(n_steps)], -1)
                                for l in range(n_layers)]).cpu()
             for name in steps[0][0][e]}
            for e in range(len(self.regions))]
        return texts

    def example_level(self) -> dict[str, Float[Tensor, "example layer head"]]:
        """Each score's mean over query tokens, per example."""
        names = self.token_level[0].keys() if self.token_level else ()
        return {n: torch.stack([t[n].mean(-1) for t in self.token_level]) for n in names}

    def sizes(self) -> tuple[Tensor, Tensor]:
        """(|R_e|, |V_e|) per example."""
        return (torch.tensor([len(r.evidence) for r in self.regions], dtype=torch.float),
                torch.tensor([len(r.vision) for r in self.regions], dtype=torch.float))


def aggregate(
    per_example: dict[str, Float[Tensor, "example layer head"]],
    n_evidence: Float[Tensor, " example"],
    n_vision: Float[Tensor, " example"],
    params: RamParams,
    model: str = "",
    dataset: str = "",
) -> dict[str, HeadScores]:
    """Example-level values -> one ``HeadScores`` per registered score (means of per-example
    values; ratios of sums, NaN for heads under the mass floor)."""
    meta = dict(model=model, dataset=dataset, n_examples=int(n_vision.numel()),
                params=asdict(params))
    out: dict[str, HeadScores] = {}
    floor_ok = per_example["visual_mass"].mean(0) >= params.mass_floor
    for name, score in SCORES.items():
        if score.kind == "mean":
            if name in per_example:
                x = per_example[name]
                out[name] = HeadScores(x.nanmean(0), name, per_example=x, **meta)
        elif score.ratio is not None and all(n in per_example for n in score.needs):
            value = score.ratio(per_example, n_evidence, n_vision)
            if value is not None:
                out[name] = HeadScores(torch.where(floor_ok, value, torch.tensor(math.nan)),
                                       name, **meta)
    return out


def score_heads(
    model: Any,
    examples: Sequence[Any],
    metric: str = "ram",
    *,
    batch_size: int = 8,
    params: RamParams | None = None,
    partial: str | Path | None = None,
    dataset: str = "",
    progress: bool = True,
) -> HeadScores:
    """Score every head on grounded examples with one registered score (``metric``: a name of
    ``corelens.scores.registry``; ``score_all`` returns every score of the same pass).

    ``partial``: a JSONL file of per-batch results, appended as batches finish; rerunning with
    the same file skips the finished batches and gives the same result.
    """
    if metric not in SCORES:
        raise ValueError(f"unknown score {metric!r}; registered: {', '.join(SCORES)}")
    if metric == "kang_spatial_entropy":  # asked for by name: compute it
        params = replace(params or RamParams(), kang_entropy=True)
    result = score_all(model, examples, batch_size=batch_size, params=params, partial=partial,
                       dataset=dataset, progress=progress)
    if result is None:
        raise RuntimeError("score_heads under torchrun: use score_all (None off rank 0)")
    if metric not in result:
        raise ValueError(f"score {metric!r} was not computed on these examples (selectivity "
                         f"needs distractor boxes; value_weighted_ram needs "
                         f"RamParams(value_weighted=True), kang_spatial_entropy "
                         f"RamParams(kang_entropy=True)); computed: {', '.join(result)}")
    return result[metric]


def score_all(
    model: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    params: RamParams | None = None,
    partial: str | Path | None = None,
    dataset: str = "",
    progress: bool = True,
) -> dict[str, HeadScores] | None:
    """Every registered score over ``examples``, as ``{name: HeadScores}``.

    Batch b always holds examples ``[b * batch_size, (b + 1) * batch_size)``. Under ``torchrun``
    (an initialised process group) the batches are dealt over the ranks and merged on rank 0 in
    batch order -- the same floats as one process -- and the other ranks get None
    (``corelens.runner``). ``partial``: resume file (per rank under ``torchrun``)."""
    params = params or RamParams()
    metric = RamMetric(model, params)
    n_batches = math.ceil(len(examples) / batch_size)
    recs = run_units(
        range(n_batches),
        lambda b: batch_record(model, metric, examples[b * batch_size:(b + 1) * batch_size]),
        partial=partial, compact=_compact, desc="scoring heads", progress=progress,
        run={"batch_size": batch_size, "n_examples": len(examples), "params": asdict(params)})
    if recs is None:
        return None
    name = getattr(model.cfg, "model_name", "") or ""
    return merge_records([recs[b] for b in range(n_batches)], params, model=str(name),
                         dataset=dataset)


def batch_record(model: Any, metric: RamMetric, batch_examples: Sequence[Any]) -> dict[str, Any]:
    """Run one batch of examples under ``metric``: the JSON-able record ``score_all`` keeps
    (per-example |R_e|, |V_e| and every score's example-level values)."""
    batch = model.prepare_examples(batch_examples)
    with torch.no_grad(), metric.attach(batch):
        model(batch, return_type=None)  # no score reads the logits
    ex = metric.example_level()
    n_ev, n_vis = metric.sizes()
    return {"n_evidence": n_ev.tolist(), "n_vision": n_vis.tolist(),
            "values": {k: v.tolist() for k, v in ex.items()}}


def _compact(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with its lists as float32 tensors (the very conversion ``merge_records`` makes,
    so nothing changes): 4 bytes a value in memory and in the gather to rank 0, not ~32."""
    out = dict(rec)
    out["values"] = {k: torch.tensor(v) for k, v in rec["values"].items()}
    out["n_evidence"], out["n_vision"] = (torch.tensor(rec["n_evidence"]),
                                          torch.tensor(rec["n_vision"]))
    return out


def merge_records(recs: Sequence[dict[str, Any]], params: RamParams, model: str = "",
                  dataset: str = "") -> dict[str, HeadScores]:
    """Per-batch records, in global batch order -> ``aggregate`` (one ``HeadScores`` each)."""
    # as_tensor: records may hold lists (from JSON) or the float32 tensors made from them
    per_example = {k: torch.cat([torch.as_tensor(r["values"][k]) for r in recs])
                   for k in recs[0]["values"]}
    n_ev = torch.cat([torch.as_tensor(r["n_evidence"]) for r in recs])
    n_vis = torch.cat([torch.as_tensor(r["n_vision"]) for r in recs])
    return aggregate(per_example, n_ev, n_vis, params, model=model, dataset=dataset)


__all__ = ["MEAN_METRICS", "RATIO_METRICS", "ExampleRegions", "RamMetric", "RamParams",
           "aggregate", "batch_record", "example_regions", "kang_spatial_entropy", "masses",
           "merge_records", "score_all", "score_heads"]
