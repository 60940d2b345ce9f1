"""Retrieval Attention Mass (RAM) and its companions, as a hook metric and as ``score_heads``.

For example e, layer l, query head h and softmax attention A (DESIGN.md, "RAM, defined"):

    RAM(e, l, h) = mean over q in Q_e of  sum over k in R_e of A[q, k]

Q_e: the positions predicting the answer tokens (teacher forcing; ``query="answer"``) or the
last prompt position (``query="last_prompt"``). V_e: the image-feature tokens of every image and
view, delimiters excluded. R_e: the vision tokens whose box overlaps an evidence box by >= tau
of the token's area (largest overlap if none reaches tau). Reported from the same pass:
visual mass VM (sum over V_e), relative RAM = RAM / VM, lift = relative RAM / (|R_e| / |V_e|),
the mean mass on the example's distractor regions and selectivity = RAM / (RAM + distractor
mass), the mass on the first real token (the usual attention sink), and, from the literature:
``retrieval`` — Wu et al. 2024's retrieval score adapted to vision: the share of query rows
whose top-1 attended key lies in R_e (their copy condition has no meaning for vision tokens: a
vision token is never copied into the answer, so it is dropped) — and ``spatial_entropy``, the
entropy (nats) of a head's attention distribution over V_e (Kang et al. 2025 use the spatial
entropy of the thresholded map to find localization heads; lower = more focused).

The attention rows come from the attention backend's taps (``AttentionInputs.pattern_rows``):
rows for Q_e only, against all keys, so the forward keeps SDPA and memory stays O(|Q| T).

Aggregation over examples: mean-type scores (ram, visual_mass, distractor_mass, sink_mass,
retrieval, spatial_entropy, value_weighted_ram) are means of per-example values, kept per
example; ratio scores (relative_ram, lift, selectivity) are ratios of sums over examples, and a
head whose mean visual mass is below ``mass_floor`` gets NaN for them, so that noise cannot top
a ranking.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from corelens.attention import AttentionInputs
from corelens.batch import MultimodalBatch
from corelens.head_scores import HeadScores

MEAN_METRICS = ("ram", "visual_mass", "distractor_mass", "sink_mass", "high_norm_mass",
                "retrieval", "spatial_entropy", "kang_spatial_entropy", "value_weighted_ram")
RATIO_METRICS = ("relative_ram", "lift", "selectivity")


@dataclass(frozen=True)
class RamParams:
    """The definition's free parameters (all recorded in every ``HeadScores``)."""

    tau: float = 0.5  # min fraction of a token's area inside the evidence to count it in R_e
    query: str = "answer"  # "answer" | "last_prompt"
    mass_floor: float = 0.02  # min mean visual mass for a head to get ratio scores
    value_weighted: bool = False  # also compute mass weighted by |v W_O| of each key
    exclude_sink: bool = False  # renormalise rows without the sink tokens' mass
    high_norm_factor: float = 10.0  # a vision token whose layer-input norm exceeds this x the
    #                                 median vision-token norm is a high-norm (sink) token


@dataclass
class ExampleRegions:
    """Position sets of one example (indexes into the padded sequence)."""

    queries: Int[Tensor, " q"]
    evidence: Int[Tensor, " r"]
    vision: Int[Tensor, " v"]
    distractors: list[Int[Tensor, " d"]]
    sink: int  # first real token
    # token grids for kang_spatial_entropy, each (positions, rows, cols, n_rows, n_cols): the
    # first image's first view, or -- for an example with videos and no image --
    # one grid per frame span of that video (``_first_view_grid``)
    grids: list[tuple[Tensor, Tensor, Tensor, int, int]] = field(default_factory=list)


def example_regions(batch: MultimodalBatch, params: RamParams) -> list[ExampleRegions]:
    out = []
    for e in range(len(batch)):
        if params.query == "answer":
            q = batch.query_positions[e]
        elif params.query == "last_prompt":
            q = batch.query_positions[e][:1]
        else:
            raise ValueError(f"query must be 'answer' or 'last_prompt', not {params.query!r}")
        first = int(batch.attention_mask[e].float().argmax())
        out.append(ExampleRegions(q.cpu(), batch.evidence_positions(e, tau=params.tau).cpu(),
                                  batch.layout.vision_positions(e).cpu(),
                                  [d.cpu() for d in batch.distractor_positions(e, params.tau)],
                                  first, _first_view_grid(batch, e)))
    return out


def _first_view_grid(batch: MultimodalBatch, e: int) -> list[tuple]:
    """The token grids ``kang_spatial_entropy`` reads: the first view of the example's first
    image (anyres tiles and other images are left out), or, when the example has videos and
    no image, every frame span of its first video (each span is one frame -- LLaVA-OneVision --
    or two -- Qwen's temporal patch -- seen as its own grid; ``masses`` weighs their entropies
    by the attention mass on each span)."""
    if not batch.layout.images[e]:
        return []
    img = batch.layout.images[e][0]
    out = []
    for v, view in enumerate(img.rows.views if img.is_video else img.rows.views[:1]):
        sel = (img.rows.kind == 0) & (img.rows.view == v)
        if sel.any():
            out.append((img.positions[sel].cpu(), img.rows.row[sel], img.rows.col[sel],
                        view.rows, view.cols))
    return out


def kang_spatial_entropy(values: Float[Tensor, "m n"], rows: Int[Tensor, " n"],
                         cols: Int[Tensor, " n"], n_rows: int, n_cols: int) -> Float[Tensor, " m"]:
    """Kang et al. 2025: threshold each attention map (over a token grid) at its mean, take the
    8-connected components of the cells above it, and return the entropy of their size
    distribution (0 = one blob; ln k = k equal blobs)."""
    import torch.nn.functional as F

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
    n = n_rows * n_cols
    ids = (lab.view(m, n) + n * torch.arange(m, dtype=torch.float32)[:, None])[on.view(m, n)]
    counts = torch.bincount(ids.long(), minlength=m * n).view(m, n).float()
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return -(p * p.clamp(min=1e-30).log()).sum(-1)


def masses(
    rows: Float[Tensor, "head q key"],
    reg: ExampleRegions,
    key_weight: Float[Tensor, "head key"] | None = None,
    exclude_sink: bool = False,
    high_norm: Int[Tensor, " s"] | None = None,
) -> dict[str, Float[Tensor, "head q"]]:
    """Per head and query row: every mass of the definition, from attention rows.

    ``high_norm``: high-norm vision tokens (reported as ``high_norm_mass``; with
    ``exclude_sink`` removed with the first-token sink and the rows renormalised)."""
    rows = rows.float()
    dev = rows.device
    ev, vis = reg.evidence.to(dev), reg.vision.to(dev)
    high = high_norm.to(dev) if high_norm is not None else torch.zeros(0, dtype=torch.long,
                                                                      device=dev)
    sink = rows[..., reg.sink]
    high_mass = rows[..., high].sum(-1)
    if exclude_sink:
        rows = rows.clone()
        rows[..., reg.sink] = 0
        rows[..., high] = 0
        rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)
    out = {"ram": rows[..., ev].sum(-1), "visual_mass": rows[..., vis].sum(-1), "sink_mass": sink,
           "high_norm_mass": high_mass}
    if reg.distractors:
        out["distractor_mass"] = torch.stack(
            [rows[..., d.to(dev)].sum(-1) for d in reg.distractors]).mean(0)
    else:
        out["distractor_mass"] = torch.full_like(out["ram"], math.nan)
    top1 = rows.argmax(-1)  # [head, q]
    out["retrieval"] = torch.isin(top1, ev).float()
    p = rows[..., vis]
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    out["spatial_entropy"] = -(p * p.clamp(min=1e-12).log()).sum(-1)
    if reg.grids:
        # one grid: its entropy; several (a video's frame spans): the mean of the spans'
        # entropies weighted by the attention mass on each span (docs/ram.md)
        ents, weights = [], []
        for pos, rr, cc, n_r, n_c in reg.grids:
            vals = rows[..., pos.to(dev)]  # [head, q, n]
            h, nq = vals.shape[:2]
            ents.append(kang_spatial_entropy(vals.reshape(h * nq, -1), rr, cc, n_r,
                                             n_c).view(h, nq).to(dev))
            weights.append(vals.sum(-1))
        if len(ents) == 1:
            out["kang_spatial_entropy"] = ents[0]
        else:
            w = torch.stack(weights)
            out["kang_spatial_entropy"] = (torch.stack(ents) * w).sum(0) / w.sum(0).clamp(
                min=1e-12)
    else:
        out["kang_spatial_entropy"] = torch.full_like(out["ram"], math.nan)
    if key_weight is not None:
        w = rows * key_weight[:, None, :].to(dev)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        out["value_weighted_ram"] = w[..., ev].sum(-1)
    return out


class RamMetric:
    """A hook metric: attach it to a forward and it records RAM & co. for every layer and head.

    >>> metric = RamMetric(model)
    >>> with metric.attach(batch):
    ...     model(batch)          # any forward of this batch: hooks, patching, your own code
    >>> metric.token_level[0]["ram"]   # [layer, head, q] for example 0

    ``token_level[e][name]`` keeps one value per query token; ``example_level()`` the mean over
    them, [n_examples, layer, head].
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
                weight = self._key_weights(inputs) if self.params.value_weighted else None
                per_layer[inputs.layer] = [
                    masses(rows[e, :, : len(reg.queries)], reg,
                           None if weight is None else weight[e], self.params.exclude_sink,
                           self._high_norm(norms.get(inputs.layer), e, reg))
                    for e, reg in enumerate(self.regions)]

        with contextlib.ExitStack() as stack:
            stack.enter_context(self.model.hooks(fwd_hooks=[
                # ln1's input: after any edit at hook_resid_pre, what the attention reads
                (f"blocks.{layer}.ln1.hook_in", keep_norm) for layer in range(n_layers)]))
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
        query), every metric against the batch's regions: ``token_level[e][name]`` is
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

    def _key_weights(self, inputs: AttentionInputs) -> Float[Tensor, "batch head key"]:
        """|v_k W_O^h|: the norm of what key k writes through head h."""
        attn = self.model.attention.layers[inputs.layer]
        w_o = attn.o.original_component.weight  # [d_model, heads * d_head]
        h, d = inputs.q.shape[1], inputs.q.shape[3]
        w_o = w_o.view(w_o.shape[0], h, d).permute(1, 2, 0)  # [head, d_head, d_model]
        v = inputs.v.repeat_interleave(inputs.n_rep, dim=1) if inputs.n_rep > 1 else inputs.v
        return torch.einsum("bhkd,hdm->bhkm", v.to(w_o.dtype), w_o).norm(dim=-1).float()

    def example_level(self) -> dict[str, Float[Tensor, "example layer head"]]:
        """Each metric's mean over query tokens, per example."""
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
    """Example-level values -> one ``HeadScores`` per metric (means, and ratios of sums)."""
    meta = dict(model=model, dataset=dataset, n_examples=int(n_vision.numel()),
                params=asdict(params))
    out: dict[str, HeadScores] = {}
    for name in MEAN_METRICS:
        if name in per_example:
            x = per_example[name]
            out[name] = HeadScores(x.nanmean(0), name, per_example=x, **meta)
    ram, vm = per_example["ram"], per_example["visual_mass"]
    floor_ok = vm.mean(0) >= params.mass_floor
    nan = torch.tensor(math.nan)
    rel = ram.sum(0) / vm.sum(0).clamp(min=1e-12)
    out["relative_ram"] = HeadScores(torch.where(floor_ok, rel, nan), "relative_ram", **meta)
    share = (n_evidence / n_vision)[:, None, None]
    lift = ram.sum(0) / (vm * share).sum(0).clamp(min=1e-12)
    out["lift"] = HeadScores(torch.where(floor_ok, lift, nan), "lift", **meta)
    dm = per_example["distractor_mass"]
    has = ~torch.isnan(dm[:, 0, 0])
    if has.any():
        sel = ram[has].sum(0) / (ram[has].sum(0) + dm[has].sum(0)).clamp(min=1e-12)
        out["selectivity"] = HeadScores(torch.where(floor_ok, sel, nan), "selectivity", **meta)
    return out


@dataclass
class _Partial:
    """Per-example values of finished batches, appended to a JSONL file as they finish."""

    path: Path | None
    done: dict[int, dict[str, Any]] = field(default_factory=dict)

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                self.done[rec["batch"]] = rec

    def write(self, rec: dict[str, Any]) -> None:
        self.done[rec["batch"]] = rec
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


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
    """Score every head on grounded examples with one of ``MEAN_METRICS + RATIO_METRICS``
    (``score_all`` returns every metric of the same pass).

    ``partial``: a JSONL file of per-batch results, appended as batches finish; rerunning with
    the same file skips the finished batches and gives the same result.
    """
    return score_all(model, examples, batch_size=batch_size, params=params, partial=partial,
                     dataset=dataset, progress=progress)[metric]


def score_all(
    model: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    params: RamParams | None = None,
    partial: str | Path | None = None,
    dataset: str = "",
    progress: bool = True,
) -> dict[str, HeadScores]:
    """Every metric of ``RamMetric`` over ``examples``, as ``{name: HeadScores}``."""
    params = params or RamParams()
    store = _Partial(Path(partial) if partial is not None else None)
    store.load()
    starts = list(range(0, len(examples), batch_size))
    metric = RamMetric(model, params)
    for b, start in enumerate(tqdm(starts, desc="scoring heads", unit="batch",
                                   disable=not progress)):
        if b in store.done:
            continue
        store.write(batch_record(model, metric, examples[start:start + batch_size], b))
    name = getattr(model.cfg, "model_name", "") or ""
    return merge_records([store.done[b] for b in range(len(starts))], params,
                         model=str(name), dataset=dataset)


def batch_record(model: Any, metric: RamMetric, batch_examples: Sequence[Any],
                 b: int) -> dict[str, Any]:
    """Run one batch of examples under ``metric``: the JSON-able record ``score_all`` keeps
    (``batch`` id, per-example |R_e|, |V_e| and every metric's example-level values)."""
    batch = model.prepare_examples(batch_examples)
    with torch.no_grad(), metric.attach(batch):
        model(batch)
    ex = metric.example_level()
    n_ev, n_vis = metric.sizes()
    return {"batch": b, "n_evidence": n_ev.tolist(), "n_vision": n_vis.tolist(),
            "values": {k: v.tolist() for k, v in ex.items()}}


def merge_records(recs: Sequence[dict[str, Any]], params: RamParams, model: str = "",
                  dataset: str = "") -> dict[str, HeadScores]:
    """Per-batch records, in global batch order -> ``aggregate`` (one ``HeadScores`` each)."""
    # as_tensor: records may hold lists (from JSON) or the float32 tensors made from them
    per_example = {k: torch.cat([torch.as_tensor(r["values"][k]) for r in recs])
                   for k in recs[0]["values"]}
    n_ev = torch.cat([torch.as_tensor(r["n_evidence"]) for r in recs])
    n_vis = torch.cat([torch.as_tensor(r["n_vision"]) for r in recs])
    return aggregate(per_example, n_ev, n_vis, params, model=model, dataset=dataset)
