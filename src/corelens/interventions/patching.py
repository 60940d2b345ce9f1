"""Activation patching, path patching and attribution patching, with the images carried along.

Every run here is a forward of a ``MultimodalBatch``: pixel values, position ids and the
family's extras go through every forward (``transformer_lens.patching``'s generic functions,
handed a bare token tensor, silently run MLLMs without their image; handed a HookedMLLM and a
batch they work too). Patching moves activations between two batches, so their positions must
line up: ``check_aligned`` fails with a clear error when the two layouts differ.

Which answer a metric scores: ``answer_logprob`` scores the answer the batch teacher-forces
(its ``answer_tokens``), ``logit_diff`` the ids it is given. A corrupted example's own answer
differs from the clean one (the queried object was recoloured: its answer is the new colour),
so ``prepare_pair`` builds BOTH batches with the clean answer and keeps the corrupted answer as
``wrong_ids``; ``check_aligned`` refuses two batches that teacher-force different answers (the
target's answer would be scored, silently the corrupted one).

Conventions (as in TransformerLens): the *target* run is patched with activations from the
*source* run; ``metric(logits, batch) -> [batch]`` is averaged over examples. Denoising =
target corrupted, source clean; noising = the reverse.

- ``patch_heads``: each head's output z (all positions) -> ``[layer, head]`` (or its q / k / v
  input, ``node=``); computed as a batched sweep (``heads_per_forward`` patched copies of the
  batch per forward, reusing the target's image features), equal to the one-head-per-forward
  loop. The position-group, residual and vision-token sweeps below batch the same way.
- ``patch_heads_by_group``: each head at each position group (vision tokens grouped per
  region: evidence / each distractor / other vision tokens; text tokens one by one).
- ``patch_residual``: ``blocks.L.hook_resid_pre`` by layer x position group.
- ``patch_vision_tokens``: the projector output (the LM's vision inputs) one vision token at a
  time -> one value per vision token of example 0's layout.
- ``path_patch``: sender heads -> receiver heads' q / k / v inputs, or -> logits (Wang et al.
  2022; Goldowsky-Dill et al. 2023); ``freeze_mlps`` chooses whether MLPs recompute. Under GQA a
  receiver's k/v input is shared by its KV group: k/v receivers are named by KV head.
- ``attribute_heads``, ``atp_star``, ``edge_attribution`` (``EdgeScores``): gradient-based
  attribution (AtP, AtP*, EAP, EAP-IG), defined in ``corelens.attribution`` and re-exported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from corelens.core.evaluate import query_metric, rows_at, score_logits
from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError, LayoutError
from corelens.heads import Head
from corelens.hook_names import EMBED, act_name
from corelens.interventions.attribution import (
    EdgeScores,
    atp_star,
    attribute_heads,
    edge_attribution,
)
from corelens.interventions.core import (
    Edit,
    Metric,
    cache_activations,
    check_aligned,
    image_features,
    index_pairs,
    position_groups,
    repeat_image_features,
    sweep,
)


# --- metrics -------------------------------------------------------------------------------
@query_metric
def answer_logprob(logits: Tensor, batch: MultimodalBatch) -> Float[Tensor, " batch"]:
    """Sum over answer tokens of their log-probability (teacher forcing); differentiable.

    Scores the answer ``batch`` teacher-forces: in a patching run the target's, which for a
    ``prepare_pair`` pair is the clean answer on both sides."""
    return score_logits(logits, batch)[0]


def logit_diff(answer_ids: Tensor, wrong_ids: Tensor) -> Metric:
    """Logit of ``answer_ids[e]`` minus ``wrong_ids[e]`` at the first query position.

    On a batch stacked k times (``repeat_batch``, as ``patch_heads``'s sweep runs it), the ids
    repeat with it: copy i's example e uses ``answer_ids[e]``."""

    @query_metric
    def metric(logits: Tensor, batch: MultimodalBatch) -> Tensor:
        q = batch.last_prompt_positions.to(logits.device)
        idx = torch.arange(len(q), device=logits.device)
        rows = rows_at(logits, batch, idx, q).float()
        a, w = answer_ids.to(logits.device), wrong_ids.to(logits.device)
        if len(a) != len(q) and len(a) and len(q) % len(a) == 0:
            a, w = a.repeat(len(q) // len(a)), w.repeat(len(q) // len(a))
        return rows[idx, a] - rows[idx, w]

    return metric


def normalised_effect(patched: Tensor, clean: float, corrupted: float) -> Tensor:
    """(patched - corrupted) / (clean - corrupted): 1 = fully restored, 0 = no effect."""
    return (patched - corrupted) / (clean - corrupted)


# --- pairs ---------------------------------------------------------------------------------
@dataclass
class ContrastPair:
    """A clean and a corrupted batch that line up token for token and teacher-force the same
    (clean) answer; ``answer_ids`` / ``wrong_ids``: the first token of each example's clean /
    corrupted answer, tokenized in the example's context."""

    clean: MultimodalBatch
    corrupted: MultimodalBatch
    answer_ids: Int[Tensor, " batch"]
    wrong_ids: Int[Tensor, " batch"]

    @property
    def logit_diff(self) -> Metric:
        """``logit_diff(answer_ids, wrong_ids)``: clean answer minus corrupted answer."""
        return logit_diff(self.answer_ids, self.wrong_ids)

    def source_target(self, direction: Literal["denoise", "noise"] = "denoise"
                      ) -> tuple[MultimodalBatch, MultimodalBatch]:
        """Denoising patches clean activations into the corrupted run; noising the reverse."""
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
        return ((self.clean, self.corrupted) if direction == "denoise"
                else (self.corrupted, self.clean))


def prepare_pair(model: Any, clean: Sequence[Any], corrupted: Sequence[Any]) -> ContrastPair:
    """Batches for patching from ``GroundedExample`` pairs: ``corrupted[i]`` is ``clean[i]``
    changed (same layout) with its own answer. Both batches teacher-force the clean answers; the
    corrupted answers become ``wrong_ids``. Refuses pairs whose answers are equal (a logit
    difference of a token with itself) and pairs that do not line up (``check_aligned``)."""
    clean, corrupted = list(clean), list(corrupted)
    if len(clean) != len(corrupted) or not clean:
        raise LayoutError(f"prepare_pair needs as many corrupted examples as clean ones (>= 1), "
                          f"got {len(clean)} clean and {len(corrupted)} corrupted")
    same = [i for i, (c, k) in enumerate(zip(clean, corrupted))
            if str(c.answer).strip() == str(k.answer).strip()]
    if same:
        raise LayoutError(f"pairs {same[:5]} have the same clean and corrupted answer "
                          f"({clean[same[0]].answer!r}): a corrupted example must change the "
                          "answer (its `answer` is the corrupted answer)")
    clean_batch = model.prepare_examples(clean)
    own = model.prepare_examples(corrupted)  # tokenizes the corrupted answers in context
    forced = model.prepare_examples([replace(k, answer=c.answer)
                                     for c, k in zip(clean, corrupted)])
    check_aligned(clean_batch, forced)
    right = torch.stack([a[0] for a in clean_batch.answer_tokens])
    wrong = torch.stack([a[0] for a in own.answer_tokens])
    tie = (right == wrong).nonzero().flatten().tolist()
    if tie:
        raise LayoutError(f"pairs {tie[:5]}: the clean and corrupted answers start with the same "
                          f"token ({clean[tie[0]].answer!r} vs {corrupted[tie[0]].answer!r}), so "
                          "the logit difference at the answer position is 0; use answers that "
                          "differ in their first token")
    return ContrastPair(clean_batch, forced, right, wrong)



# --- activation patching --------------------------------------------------------------------
def patch_heads(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, heads_per_forward: int = 8, node: Literal["z", "q", "k", "v"] = "z",
    reuse_vision: bool = True, resume: bool = True, progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """Metric of the target run with one head's z (all positions) taken from the source.

    ``node="q"`` patches a query head's query input instead (``hook_q``); ``"k"`` / ``"v"`` a
    KV head's key / value input (``[layer, kv_head]``: shared by the KV group under GQA).
    ``heads_per_forward`` patched copies of the target run in one forward; ``reuse_vision``:
    the copies reuse the target's image features (computed once) instead of rerunning the
    vision tower per copy; ``resume``: a forward patching layer l or later does not rerun the
    blocks before it (``interventions.core.sweep``)."""
    check_aligned(source, target)
    L = model.cfg.n_layers
    if node not in ("z", "q", "k", "v"):
        raise ValueError(f"node must be 'z', 'q', 'k' or 'v', not {node!r}")
    H = model.cfg.n_heads if node in ("z", "q") else (model.cfg.n_key_value_heads
                                                      or model.cfg.n_heads)
    names = [act_name(node, l) for l in range(L)]
    src = cache_activations(model, source, names)

    def job(l: int, h: int) -> list[tuple[str, Edit]]:
        def edit(x: Tensor) -> None:
            x[:, :, h] = src[names[l]][:, :, h]
        return [(names[l], edit)]

    values = sweep(model, target, metric, [job(l, h) for l in range(L) for h in range(H)],
                    per_forward=heads_per_forward, reuse_vision=reuse_vision,
                    resume=resume, progress=progress, desc="patching heads")
    return values.mean(1).view(L, H)


def patch_heads_by_group(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, per_forward: int = 8, progress: bool = False,
) -> tuple[Float[Tensor, "layer head group"], list[str]]:
    """Metric with one head's z at one position group (``position_groups``) taken from the
    source (``per_forward`` patched copies per forward)."""
    check_aligned(source, target)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    groups = position_groups(target)
    names = [act_name("z", l) for l in range(L)]
    src = cache_activations(model, source, names)
    index = [index_pairs(per) for _, per in groups]

    def job(l: int, h: int, g: int) -> list[tuple[str, Edit]]:
        ex, pos = index[g]

        def edit(z: Tensor) -> None:
            z[ex, pos, h] = src[names[l]][ex, pos, h]
        return [(names[l], edit)]

    jobs = [job(l, h, g) for l in range(L) for h in range(H) for g in range(len(groups))]
    values = sweep(model, target, metric, jobs, per_forward=per_forward, progress=progress,
                    desc="patching")
    return values.mean(1).view(L, H, len(groups)), [label for label, _ in groups]


def patch_residual(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, per_forward: int = 8, progress: bool = False,
) -> tuple[Float[Tensor, "layer group"], list[str]]:
    """Metric with ``blocks.L.hook_resid_pre`` at one position group taken from the source
    (``per_forward`` patched copies per forward)."""
    check_aligned(source, target)
    L = model.cfg.n_layers
    groups = position_groups(target)
    names = [act_name("resid_pre", l) for l in range(L)]
    src = cache_activations(model, source, names)
    index = [index_pairs(per) for _, per in groups]

    def job(l: int, g: int) -> list[tuple[str, Edit]]:
        ex, pos = index[g]

        def edit(x: Tensor) -> None:
            x[ex, pos] = src[names[l]][ex, pos]
        return [(names[l], edit)]

    jobs = [job(l, g) for l in range(L) for g in range(len(groups))]
    values = sweep(model, target, metric, jobs, per_forward=per_forward, progress=progress,
                    desc="patching residual")
    return values.mean(1).view(L, len(groups)), [label for label, _ in groups]


def patch_vision_tokens(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, example: int = 0, per_forward: int = 8, progress: bool = False,
) -> Float[Tensor, " vision"]:
    """Metric with the LM input of one vision token (the projector's output, as it enters the
    decoder at ``blocks.0.hook_resid_pre``) taken from the source; ``example``'s vision tokens
    in layout order (``layout.boxes(example)`` gives their boxes); ``per_forward`` patched
    copies per forward."""
    check_aligned(source, target)
    name = EMBED
    src = cache_activations(model, source, [name])[name]
    vis = target.layout.vision_positions(example).tolist()

    def job(p: int) -> list[tuple[str, Edit]]:
        def edit(x: Tensor) -> None:
            x[example, p] = src[example, p]
        return [(name, edit)]

    values = sweep(model, target, metric, [job(p) for p in vis], per_forward=per_forward,
                    progress=progress, desc="patching tokens")
    return values[:, example]


# --- path patching --------------------------------------------------------------------------
Receiver = tuple[int, int, Literal["q", "k", "v"]]


def path_patch(
    model: Any,
    source: MultimodalBatch,
    target: MultimodalBatch,
    metric: Metric,
    senders: Sequence[Head],
    receivers: Sequence[Receiver] | Literal["logits"] = "logits",
    *,
    freeze_mlps: bool = True,
) -> float:
    """The effect of the paths sender heads -> receivers, with the senders' z from the source.

    Step 1: run the target with the senders' z patched from the source and every other head's z
    frozen to its target value (MLPs frozen too when ``freeze_mlps``, else recomputed, as in
    Wang et al. 2022 vs Goldowsky-Dill et al. 2023); record the receivers' inputs
    (``hook_q`` for a query receiver (layer, head); ``hook_k`` / ``hook_v`` for a KV receiver
    (layer, kv_head) under GQA). Step 2: run the target with only those receiver inputs patched.
    With ``receivers="logits"`` step 1 is the measurement (the direct paths and, with
    recomputed MLPs, the paths through MLPs). ``path_patch_sets`` with one sender set.
    """
    return float(path_patch_sets(model, source, target, metric, [senders], receivers,
                                 freeze_mlps=freeze_mlps, per_forward=1)[0])


def path_patch_sets(
    model: Any,
    source: MultimodalBatch,
    target: MultimodalBatch,
    metric: Metric,
    sender_sets: Sequence[Sequence[Head]],
    receivers: Sequence[Receiver] | Literal["logits"] = "logits",
    *,
    freeze_mlps: bool = True,
    per_forward: int = 8,
    progress: bool = False,
    **sweep_kw: Any,
) -> Float[Tensor, " set"]:
    """``path_patch`` of every sender set (e.g. ``[[(l, h)] for each head]``), the metric's mean
    over the batch per set: the two caches once, each step as one batched sweep
    (``per_forward`` stacked copies, each resumed at its first edited layer, that layer's
    attention replayed where only z is edited; ``interventions.core.sweep``, whose ``resume`` /
    ``replay`` / ``trim`` / ``reuse_vision`` pass through ``sweep_kw``). Equal to one
    ``path_patch`` run per set."""
    jobs = _path_edits(model, source, target, sender_sets, freeze_mlps)
    kw = dict(per_forward=per_forward, progress=progress, **sweep_kw)
    if receivers == "logits":
        return sweep(model, target, metric, jobs, desc="path patching", **kw).mean(1)
    names = sorted({act_name(kind, l) for l, _, kind in receivers})
    recorded: list[dict[str, Tensor]] = [{} for _ in jobs]

    def record(i: int, name: str) -> Edit:
        def edit(x: Tensor) -> None:
            recorded[i][name] = x.clone()
        return edit

    sweep(model, target, metric, [job + [(n, record(i, n)) for n in names]
                                  for i, job in enumerate(jobs)],
          desc="path patching, step 1", **kw)
    by_name: dict[str, list[int]] = {}
    for l, h, kind in receivers:
        by_name.setdefault(act_name(kind, l), []).append(int(h))

    def patch(i: int, name: str, heads: list[int]) -> Edit:
        def edit(x: Tensor) -> None:
            for h in heads:
                x[:, :, h] = recorded[i][name][:, :, h]
        return edit

    step2 = [[(n, patch(i, n, hs)) for n, hs in by_name.items()] for i in range(len(jobs))]
    return sweep(model, target, metric, step2, desc="path patching, step 2", **kw).mean(1)


def _path_edits(model: Any, source: MultimodalBatch, target: MultimodalBatch,
                sender_sets: Sequence[Sequence[Head]], freeze_mlps: bool
                ) -> list[list[tuple[str, Edit]]]:
    """Per sender set, the in-place edits of a target run with the senders' z from the source
    and every other head's z (and, when ``freeze_mlps``, every MLP output) frozen to the target
    run's: from the set's first layer on (before it they are the target run's values anyway)."""
    check_aligned(source, target)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sets = [sorted({(int(l), int(h)) for l, h in senders}) for senders in sender_sets]
    outside = sorted({(l, h) for send in sets for l, h in send
                      if not (0 <= l < L and 0 <= h < H)})
    if outside:
        raise InputError(f"sender head(s) {outside} are outside this model ({L} layers x {H} "
                         "heads): senders are (layer, head) pairs")
    z_names = [act_name("z", l) for l in range(L)]
    mlp_names = [act_name("mlp_out", l) for l in range(L)]
    src_z = cache_activations(model, source, z_names)
    tgt = cache_activations(model, target, z_names + (mlp_names if freeze_mlps else []))

    def z_edit(layer: int, heads: list[int]) -> Edit:
        def edit(z: Tensor) -> None:
            z.copy_(tgt[z_names[layer]])
            for h in heads:
                z[:, :, h] = src_z[z_names[layer]][:, :, h]
        return edit

    def frozen(name: str) -> Edit:
        return lambda x: x.copy_(tgt[name])

    jobs = []
    for send in sets:
        edits: list[tuple[str, Edit]] = []
        for layer in range(send[0][0] if send else L, L):
            edits.append((z_names[layer], z_edit(layer, [h for l, h in send if l == layer])))
            if freeze_mlps:
                edits.append((mlp_names[layer], frozen(mlp_names[layer])))
        jobs.append(edits)
    return jobs


__all__ = [
    "ContrastPair",
    "EdgeScores",
    "Edit",
    "Head",
    "Metric",
    "answer_logprob",
    "atp_star",
    "attribute_heads",
    "check_aligned",
    "edge_attribution",
    "image_features",
    "logit_diff",
    "normalised_effect",
    "patch_heads",
    "patch_heads_by_group",
    "patch_residual",
    "patch_vision_tokens",
    "path_patch",
    "path_patch_sets",
    "position_groups",
    "prepare_pair",
    "repeat_image_features",
]
