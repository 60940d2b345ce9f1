"""Head ablation that carries the image through every forward: zero, mean, resample, knockout.

``ablate(model, heads, method=...)`` is a context manager; every forward inside it (``model(b)``,
``evaluate``, ``run_with_cache``, RAM scoring) runs with the heads ablated.

- ``zero``: the head's output z (``hook_z``, before W_O) is set to 0 at every position.
- ``mean``: z is replaced by its mean over a reference batch, position by position, where
  positions are aligned by token role: a vision token by (image, view, row, col), a text token
  by its offset from the first answer-predicting position. A role the reference never has is an
  error naming the position (the two layouts do not line up).
- ``resample``: z comes from another example of the reference batch (example e takes reference
  example ``(e + 1) % n`` when the reference is the batch itself), aligned by role the same way.
- ``knockout``: the head's attention may not reach the evidence tokens (``keys="evidence"``) or
  any vision token (``keys="vision"``); its output is otherwise computed normally. Built on the
  attention backend's per-head key mask, so it works under SDPA.

``text_to_image_knockout(model, batch, layers)``: in every head of ``layers``, text positions
may not attend to vision tokens (the information-flow test of the MLLM literature).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.core.evaluate import score_logits
from corelens.data.batch import MultimodalBatch
from corelens.errors import LayoutError
from corelens.heads import Head
from corelens.hook_names import act_name
from corelens.interventions.core import Role, token_roles
from corelens.runner import run_units

Method = Literal["zero", "mean", "resample", "knockout"]


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return out


def _reference_z(model: Any, reference: MultimodalBatch,
                 layers: Sequence[int]) -> dict[int, Float[Tensor, "batch pos head d"]]:
    names = [act_name("z", l) for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference, names_filter=names, logits_to_keep=1)
    return {l: cache[n].detach() for l, n in zip(layers, names)}


def _aligned(target_roles: list[Role | None], ref_roles: list[list[Role | None]],
             ref_z: Tensor, example: int, pick: list[int] | None) -> Tensor:
    """z for each target position: the mean over ``pick`` (or all) reference examples of the z at
    the position with the same role. ``ref_z``: [n_ref, pos, head, d] (selected heads)."""
    index: dict[Role, list[tuple[int, int]]] = {}
    for r, roles in enumerate(ref_roles):
        if pick is not None and r not in pick:
            continue
        for p, role in enumerate(roles):
            if role is not None:
                index.setdefault(role, []).append((r, p))
    out = torch.zeros((len(target_roles),) + tuple(ref_z.shape[2:]), dtype=ref_z.dtype,
                      device=ref_z.device)
    for p, role in enumerate(target_roles):
        if role is None:
            continue
        hits = index.get(role)
        if not hits:
            raise LayoutError(
                f"example {example}, position {p} ({role}) has no counterpart in the reference "
                "batch: the layouts do not line up (different image sizes or prompt lengths); "
                "use references with the same layout, or zero ablation"
            )
        rr = torch.tensor([h[0] for h in hits], device=ref_z.device)
        pp = torch.tensor([h[1] for h in hits], device=ref_z.device)
        out[p] = ref_z[rr, pp].mean(0)
    return out


@contextlib.contextmanager
def ablate(
    model: Any,
    heads: Sequence[Head],
    method: Method = "zero",
    *,
    batch: MultimodalBatch | None = None,
    reference: MultimodalBatch | None = None,
    keys: Literal["evidence", "vision"] = "vision",
) -> Iterator[None]:
    """Ablate ``heads`` (a list of (layer, head)) for every forward inside the block.

    ``mean``, ``resample`` and ``knockout`` need the ``batch`` that will be run (positions differ
    per batch); ``mean`` and ``resample`` also a ``reference`` batch (default: ``batch`` itself).
    """
    per_layer = _by_layer(heads)
    if not per_layer:
        yield
        return
    n_heads = model.cfg.n_heads
    for layer, hs in per_layer.items():
        if not 0 <= layer < model.cfg.n_layers or any(not 0 <= h < n_heads for h in hs):
            raise ValueError(f"no head {[(layer, h) for h in hs]} in a model of "
                             f"{model.cfg.n_layers} layers x {n_heads} heads")
    if method != "zero" and batch is None:
        raise ValueError(f"method={method!r} needs batch= (the batch that will be run)")

    with contextlib.ExitStack() as stack:
        if method == "knockout":
            assert batch is not None
            for layer, hs in per_layer.items():
                allowed = torch.ones(len(batch), n_heads, 1, batch.seq_len, dtype=torch.bool,
                                     device=model.device)
                for e in range(len(batch)):
                    blocked = (batch.evidence_positions(e) if keys == "evidence"
                               else batch.layout.vision_positions(e)).to(model.device)
                    for h in hs:
                        allowed[e, h, 0, blocked] = False
                stack.enter_context(model.attention.key_mask(layer, allowed))
            yield
            return

        fills: dict[int, Tensor] = {}
        if method in ("mean", "resample"):
            assert batch is not None
            ref = reference if reference is not None else batch
            ref_z = _reference_z(model, ref, list(per_layer))
            ref_roles = [token_roles(ref, r) for r in range(len(ref))]
            for layer, hs in per_layer.items():
                z = ref_z[layer][:, :, hs]
                rows = []
                for e in range(len(batch)):
                    pick = None
                    if method == "resample":
                        pick = [(e + 1) % len(ref)] if ref is batch else [e % len(ref)]
                    rows.append(_aligned(token_roles(batch, e), ref_roles, z, e, pick))
                fills[layer] = torch.stack(rows)  # [batch, pos, len(hs), d]
        elif method != "zero":
            raise ValueError(f"unknown ablation method {method!r}: zero, mean, resample, knockout")

        def hook_for(layer: int, hs: list[int]):
            def hook(z: Tensor, hook: Any) -> Tensor:
                z = z.clone()
                if method == "zero":
                    z[:, :, hs] = 0
                else:
                    fill = fills[layer]
                    if fill.shape[:2] != z.shape[:2]:
                        raise LayoutError(
                            f"ablate(method={method!r}) was set up for a batch of shape "
                            f"{tuple(fill.shape[:2])} but ran on {tuple(z.shape[:2])}: enter "
                            "ablate() with the batch you run")
                    z[:, :, hs] = fill.to(z.dtype)
                return z
            return hook

        stack.enter_context(model.hooks(fwd_hooks=[
            (act_name("z", layer), hook_for(layer, hs))
            for layer, hs in per_layer.items()]))
        yield


@contextlib.contextmanager
def text_to_image_knockout(model: Any, batch: MultimodalBatch,
                           layers: Sequence[int]) -> Iterator[None]:
    """In every head of ``layers``, text positions may not attend to any vision token."""
    vision = batch.layout.vision_mask().to(model.device)  # [b, T]
    text_rows = ~vision & batch.attention_mask.bool().to(model.device)
    allowed = ~(text_rows[:, :, None] & vision[:, None, :])  # [b, Tq, Tk]
    allowed = allowed[:, None]
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(model.attention.key_mask(layer, allowed))
        yield


# --- ablation curves ------------------------------------------------------------------------
@dataclass
class AblationCurve:
    """Accuracy and mean answer log-prob when ablating the top-k heads by a score, k random
    heads (several seeds) and the bottom-k, at several fractions of all heads.

    ``to_dict()`` is what ``views`` plots and ``save`` writes (JSON): per metric ("accuracy",
    "logprob") the lists ``top``, ``bottom``, ``random_mean``, ``random_lo``, ``random_hi``
    (the 2.5/97.5 percentiles over seeds) and ``random_seeds`` (one list per fraction), aligned
    with ``fracs`` / ``ks``; ``none`` is the unablated value.
    """

    fracs: list[float]
    ks: list[int]
    method: str
    score_metric: str
    n_examples: int
    values: dict[str, dict[str, Any]]  # metric -> {"none", "top", "bottom", "random_seeds"}

    def to_dict(self, metric: str = "accuracy") -> dict[str, Any]:
        v = self.values[metric]
        seeds = torch.tensor(v["random_seeds"], dtype=torch.float64)  # [frac, seed]
        out = {"fracs": self.fracs, "ks": self.ks, "metric": metric, "method": self.method,
               "score_metric": self.score_metric, "n_examples": self.n_examples,
               "none": v["none"], "top": v["top"], "bottom": v["bottom"],
               "random_mean": seeds.mean(1).tolist(),
               "random_lo": torch.quantile(seeds, 0.025, dim=1).tolist(),
               "random_hi": torch.quantile(seeds, 0.975, dim=1).tolist(),
               "random_seeds": v["random_seeds"]}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({m: self.to_dict(m) for m in self.values}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "AblationCurve":
        d = json.loads(Path(path).read_text())
        first = next(iter(d.values()))
        values = {m: {k: x[k] for k in ("none", "top", "bottom", "random_seeds")}
                  for m, x in d.items()}
        return cls(first["fracs"], first["ks"], first["method"], first["score_metric"],
                   first["n_examples"], values)


def score_batch(model: Any, batch: MultimodalBatch, heads: Sequence[Head], method: Method,
                reference: MultimodalBatch | None = None) -> tuple[float, float, int]:
    """(correct answers, summed answer log-prob, n) of one batch with ``heads`` ablated."""
    with ablate(model, heads, method, batch=batch if method != "zero" else None,
                reference=reference), torch.no_grad():
        logprobs, correct, _ = score_logits(model(batch, logits_to_keep=batch.logits_to_keep),
                                            batch)
    return float(correct.sum()), float(logprobs.sum()), len(batch)


def ablation_jobs(n_layers: int, n_heads: int, ranked: Sequence[Head], fracs: Sequence[float],
                  baselines: Sequence[str], seeds: Sequence[int]
                  ) -> tuple[list[int], list[tuple[str, int, list[Head]]]]:
    """(k per fraction, the (kind, fraction index, heads) jobs of an ablation curve, in order):
    no ablation, then per fraction the top-k, the bottom-k and one random draw per seed."""

    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    ks = [max(1, math.ceil(f * n_layers * n_heads)) for f in fracs]
    jobs: list[tuple[str, int, list[Head]]] = [("none", -1, [])]
    for i, k in enumerate(ks):
        jobs.append(("top", i, list(ranked[:k])))
        if "bottom" in baselines:
            jobs.append(("bottom", i, list(ranked[-k:])))
        if "random" in baselines:
            for s in seeds:
                jobs.append((f"random:{s}", i, random.Random(s * 1000 + k).sample(all_heads, k)))
    return ks, jobs


def ablation_curve(
    model: Any,
    examples: Sequence[Any],
    scores: Any,
    fracs: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    baselines: Sequence[str] = ("random", "bottom"),
    seeds: Sequence[int] = tuple(range(8)),
    *,
    method: Method = "zero",
    batch_size: int = 16,
    reference: MultimodalBatch | None = None,
    partial: str | Path | None = None,
    progress: bool = True,
) -> AblationCurve | None:
    """Ablate the top-k heads of ``scores`` (a ``HeadScores``) vs k random heads (one draw per
    seed) vs the bottom-k, for k = ceil(frac * n_heads_total) at each fraction.

    The (job, batch) units run on ``corelens.runner``: ``partial`` makes the sweep resumable,
    and under ``torchrun`` the units are dealt over the ranks and summed per job in batch order
    on rank 0 (the same floats as one process; the other ranks get None)."""
    starts = list(range(0, len(examples), batch_size))
    ks, jobs = ablation_jobs(model.cfg.n_layers, model.cfg.n_heads, scores.rank(), fracs,
                             baselines, seeds)
    batches: dict[int, MultimodalBatch] = {}

    def compute(unit: tuple[int, int]) -> dict[str, Any]:
        j, b = unit
        if b not in batches:
            batches[b] = model.prepare_examples(examples[starts[b]:starts[b] + batch_size])
        correct, logprob, n = score_batch(model, batches[b], jobs[j][2], method, reference)
        return {"correct": correct, "logprob": logprob, "n": n}

    units = [(j, b) for j in range(len(jobs)) for b in range(len(starts))]
    recs = run_units(units, compute, partial=partial, desc="ablation curve", progress=progress,
                     run={"jobs": len(jobs), "batch_size": batch_size,
                          "n_examples": len(examples), "method": method})
    if recs is None:
        return None
    acc: dict[str, Any] = {"top": [None] * len(ks), "bottom": [None] * len(ks),
                           "random_seeds": [[] for _ in ks]}
    lps: dict[str, Any] = {"top": [None] * len(ks), "bottom": [None] * len(ks),
                           "random_seeds": [[] for _ in ks]}
    for j, (kind, i, _) in enumerate(jobs):
        totals = [recs[(j, b)] for b in range(len(starts))]  # summed in batch order
        n = sum(t["n"] for t in totals)
        a = sum(t["correct"] for t in totals) / n
        lp = sum(t["logprob"] for t in totals) / n
        if kind == "none":
            acc["none"], lps["none"] = a, lp
        elif kind.startswith("random"):
            acc["random_seeds"][i].append(a)
            lps["random_seeds"][i].append(lp)
        else:
            acc[kind][i], lps[kind][i] = a, lp
    return AblationCurve(list(fracs), ks, method, getattr(scores, "metric", ""), len(examples),
                         {"accuracy": acc, "logprob": lps})
