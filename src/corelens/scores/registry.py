"""The head-score registry: every score corelens computes, one registered function each.

A score is **mean**-type or **ratio**-type (docs/ram.md):

- a mean score maps one example's attention rows to one value per (head, query row)
  (``ScoreInputs -> [head, q]``); ``HeadScores`` holds the mean over examples of the per-example
  mean over query rows, and keeps the per-example values;
- a ratio score is a ratio of sums over examples of mean scores (``needs`` names them), so one
  example with little visual mass cannot dominate; a head whose mean visual mass is under
  ``RamParams.mass_floor`` gets NaN.

Adding a score = one decorated function here: ``corelens score --metric``, ``corelens accelerate
--scores``, ``ram.score_all`` and the distributed runner read this registry. A score that reads
something other than attention rows (a norm, a gradient) adds a field to ``ScoreInputs`` and
fills it in ``RamMetric.attach``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from corelens.scores.regions import ExampleRegions


@dataclass
class ScoreInputs:
    """What a mean score reads for one example: attention rows of its query positions."""

    rows: Float[Tensor, "head q key"]  # renormalised without sinks under ``exclude_sink``
    raw: Float[Tensor, "head q key"]  # the attention as computed
    regions: ExampleRegions
    key_weight: Float[Tensor, "head key"] | None = None  # |v_k W_O^h| (``value_weighted``)
    high_norm: Int[Tensor, " s"] | None = None  # high-norm (massive-activation) vision tokens


MeanFn = Callable[[ScoreInputs], "Float[Tensor, 'head q'] | None"]
RatioFn = Callable[[dict[str, Tensor], Tensor, Tensor], "Float[Tensor, 'layer head'] | None"]


@dataclass(frozen=True)
class Score:
    name: str
    kind: Literal["mean", "ratio"]
    doc: str
    per_query: MeanFn | None = None  # mean scores
    ratio: RatioFn | None = None  # ratio scores: (per-example means, |R_e|, |V_e|) -> [l, h]
    needs: tuple[str, ...] = ()  # the mean scores a ratio reads


SCORES: dict[str, Score] = {}


def mean_score(name: str) -> Callable[[MeanFn], MeanFn]:
    """Register a mean score: ``fn(ScoreInputs) -> [head, q]`` (None: not computed here)."""
    def register(fn: MeanFn) -> MeanFn:
        SCORES[name] = Score(name, "mean", (fn.__doc__ or "").strip(), per_query=fn)
        return fn
    return register


def ratio_score(name: str, needs: tuple[str, ...]) -> Callable[[RatioFn], RatioFn]:
    """Register a ratio score: ``fn(per_example, n_evidence, n_vision) -> [layer, head]``."""
    def register(fn: RatioFn) -> RatioFn:
        SCORES[name] = Score(name, "ratio", (fn.__doc__ or "").strip(), ratio=fn, needs=needs)
        return fn
    return register


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered score names (of one ``kind``: "mean" or "ratio"), in registration order."""
    return tuple(n for n, s in SCORES.items() if kind is None or s.kind == kind)


def per_query_scores(inputs: ScoreInputs) -> dict[str, Float[Tensor, "head q"]]:
    """Every mean score of one example, per head and query row."""
    out = {}
    for name, score in SCORES.items():
        if score.per_query is not None and (value := score.per_query(inputs)) is not None:
            out[name] = value
    return out


def _sum_over(rows: Tensor, positions: Tensor) -> Tensor:
    return rows[..., positions.to(rows.device)].sum(-1)


# --- mean scores ------------------------------------------------------------------------------
@mean_score("ram")
def _ram(x: ScoreInputs) -> Tensor:
    """Attention mass on the evidence tokens R_e."""
    return _sum_over(x.rows, x.regions.evidence)


@mean_score("visual_mass")
def _visual_mass(x: ScoreInputs) -> Tensor:
    """Attention mass on every vision-feature token V_e."""
    return _sum_over(x.rows, x.regions.vision)


@mean_score("distractor_mass")
def _distractor_mass(x: ScoreInputs) -> Tensor:
    """Mean over the example's distractor regions of the mass on each (NaN without any)."""
    if not x.regions.distractors:
        return torch.full(x.rows.shape[:2], math.nan, device=x.rows.device)
    return torch.stack([_sum_over(x.rows, d) for d in x.regions.distractors]).mean(0)


@mean_score("sink_mass")
def _sink_mass(x: ScoreInputs) -> Tensor:
    """Mass on the first real token (the usual attention sink), before any renormalisation."""
    return x.raw[..., x.regions.sink]


@mean_score("high_norm_mass")
def _high_norm_mass(x: ScoreInputs) -> Tensor:
    """Mass on high-norm vision tokens (massive activations), before any renormalisation."""
    if x.high_norm is None:
        return torch.zeros(x.raw.shape[:2], device=x.raw.device)
    return _sum_over(x.raw, x.high_norm)


@mean_score("retrieval")
def _retrieval(x: ScoreInputs) -> Tensor:
    """Wu et al. 2024's retrieval score for vision: is the top-1 attended key in R_e."""
    return torch.isin(x.rows.argmax(-1), x.regions.evidence.to(x.rows.device)).float()


@mean_score("spatial_entropy")
def _spatial_entropy(x: ScoreInputs) -> Tensor:
    """Entropy (nats) of the attention distribution over V_e (lower = more focused)."""
    p = x.rows[..., x.regions.vision.to(x.rows.device)]
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


@mean_score("kang_spatial_entropy")
def _kang(x: ScoreInputs) -> Tensor:
    """Kang et al. 2025: entropy of the blob sizes of the thresholded map over the first view
    (a video: frame spans' entropies weighted by their attention mass); NaN without a grid;
    needs ``RamParams.kang_entropy``."""
    if x.regions.grids is None:
        return None
    if not x.regions.grids:
        return torch.full(x.rows.shape[:2], math.nan, device=x.rows.device)
    ents, weights = [], []
    for pos, rr, cc, n_r, n_c in x.regions.grids:
        vals = x.rows[..., pos.to(x.rows.device)]  # [head, q, n]
        h, nq = vals.shape[:2]
        ents.append(kang_spatial_entropy(vals.reshape(h * nq, -1), rr, cc, n_r,
                                         n_c).view(h, nq).to(x.rows.device))
        weights.append(vals.sum(-1))
    if len(ents) == 1:
        return ents[0]
    w = torch.stack(weights)
    return (torch.stack(ents) * w).sum(0) / w.sum(0).clamp(min=1e-12)


@mean_score("value_weighted_ram")
def _value_weighted_ram(x: ScoreInputs) -> Tensor | None:
    """RAM of the rows reweighted by |v_k W_O^h| (what each key writes); needs
    ``RamParams.value_weighted``."""
    if x.key_weight is None:
        return None
    w = x.rows * x.key_weight[:, None, :].to(x.rows.device)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return _sum_over(w, x.regions.evidence)


# --- ratio scores -----------------------------------------------------------------------------
@ratio_score("relative_ram", needs=("ram", "visual_mass"))
def _relative_ram(v: dict[str, Tensor], n_evidence: Tensor, n_vision: Tensor) -> Tensor:
    """RAM / visual mass, as a ratio of sums over examples."""
    return v["ram"].sum(0) / v["visual_mass"].sum(0).clamp(min=1e-12)


@ratio_score("lift", needs=("ram", "visual_mass"))
def _lift(v: dict[str, Tensor], n_evidence: Tensor, n_vision: Tensor) -> Tensor:
    """Relative RAM over the evidence's share of the vision tokens |R_e| / |V_e|."""
    share = (n_evidence / n_vision)[:, None, None]
    return v["ram"].sum(0) / (v["visual_mass"] * share).sum(0).clamp(min=1e-12)


@ratio_score("selectivity", needs=("ram", "distractor_mass"))
def _selectivity(v: dict[str, Tensor], n_evidence: Tensor, n_vision: Tensor) -> Tensor | None:
    """RAM / (RAM + distractor mass) over the examples that have distractors (None if none)."""
    ram, dm = v["ram"], v["distractor_mass"]
    has = ~torch.isnan(dm[:, 0, 0])
    if not has.any():
        return None
    return ram[has].sum(0) / (ram[has].sum(0) + dm[has].sum(0)).clamp(min=1e-12)


# --- helpers ------------------------------------------------------------------------------------
def kang_spatial_entropy(values: Float[Tensor, "m n"], rows: Int[Tensor, " n"],
                         cols: Int[Tensor, " n"], n_rows: int, n_cols: int) -> Float[Tensor, " m"]:
    """Kang et al. 2025: threshold each attention map (over a token grid) at its mean, take the
    8-connected components of the cells above it, and return the entropy of their size
    distribution (0 = one blob; ln k = k equal blobs)."""
    m = values.shape[0]
    grid = torch.full((m, n_rows, n_cols), -math.inf, dtype=torch.float32)
    grid[:, rows, cols] = values.float().cpu()
    on = grid > values.float().cpu().mean(-1)[:, None, None]
    n = n_rows * n_cols
    idx = torch.arange(n, dtype=torch.float32).view(1, n_rows, n_cols)
    lab = torch.where(on, idx.expand(m, -1, -1), torch.tensor(math.inf))
    for _ in range(n):  # propagate the smallest label through each component
        low = -F.max_pool2d(-lab[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(on, torch.minimum(lab, low), torch.tensor(math.inf)).view(m, n)
        # pointer jumping: a cell takes its label's label (same component, never larger), so a
        # long thin component converges in ~log(length) steps instead of ~length
        ptr = torch.where(new.isfinite(), new, 0).long()
        new = torch.where(new.isfinite(), torch.minimum(new, new.gather(1, ptr)), new)
        new = new.view(m, n_rows, n_cols)
        if torch.equal(new, lab):
            break
        lab = new
    # component sizes of every map at once: the label is the component's smallest cell index
    ids = (lab.view(m, n) + n * torch.arange(m, dtype=torch.float32)[:, None])[on.view(m, n)]
    counts = torch.bincount(ids.long(), minlength=m * n).view(m, n).float()
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return -(p * p.clamp(min=1e-30).log()).sum(-1)
