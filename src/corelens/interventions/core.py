"""The intervention core that patching, attribution and ablation share.

What every intervention on an MLLM needs (hook names are ``corelens.hook_names.act_name``): a
cache of activations (``cache_activations``), whether two batches line up position for position
(``check_aligned``), what each position is (``token_roles``, ``position_groups``), the image
features of a batch computed once and handed to stacked copies of it (``image_features``,
``stacked``), and the batched runner that applies many edits, one per stacked copy, in one
forward (``sweep``). Nothing here knows a method (patching, attribution, ablation) or a family.
Heads are ``corelens.heads.Head``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.core.evaluate import logits_to_keep
from corelens.data.batch import MultimodalBatch, repeat_batch
from corelens.errors import LayoutError

Metric = Callable[[Tensor, MultimodalBatch], Float[Tensor, " batch"]]
Edit = Callable[[Tensor], None]  # edits one copy's rows of a hooked activation in place
Role = tuple


def cache_activations(model: Any, batch: MultimodalBatch, names: list[str]
                      ) -> dict[str, Tensor]:
    """The activations at ``names`` of one forward of ``batch`` (no grad, detached)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names, logits_to_keep=1)
    return {n: cache[n].detach() for n in names}


def check_aligned(a: MultimodalBatch, b: MultimodalBatch) -> None:
    """Both batches must put the same kind of token at every position and teacher-force the
    same answer tokens (else ``answer_logprob`` on the target scores another answer)."""
    if a.input_ids.shape != b.input_ids.shape:
        raise LayoutError(f"cannot patch between batches of shapes {tuple(a.input_ids.shape)} "
                          f"and {tuple(b.input_ids.shape)}: build pairs with the same prompt "
                          "length and image sizes")
    if not torch.equal(a.attention_mask.cpu(), b.attention_mask.cpu()):
        raise LayoutError("cannot patch: the two batches are padded differently")
    for e in range(len(a)):
        va, vb = a.layout.vision_positions(e), b.layout.vision_positions(e)
        if not torch.equal(va, vb):
            raise LayoutError(f"cannot patch: example {e}'s vision tokens sit at different "
                              "positions in the two batches (different image sizes?)")
        if not torch.equal(a.query_positions[e].cpu(), b.query_positions[e].cpu()):
            raise LayoutError(f"cannot patch: example {e}'s answer positions differ")
        if not torch.equal(a.answer_tokens[e].cpu(), b.answer_tokens[e].cpu()):
            raise LayoutError(
                f"cannot patch: example {e} teacher-forces different answers in the two batches "
                f"(tokens {a.answer_tokens[e].tolist()} vs {b.answer_tokens[e].tolist()}): a "
                "metric such as answer_logprob would score the target's answer, for a corrupted "
                "target the corrupted one. Build the pair with patching.prepare_pair(model, "
                "clean, corrupted), which gives both batches the clean answer and keeps the "
                "corrupted one as wrong_ids")
        ia, ib = a.layout.images[e], b.layout.images[e]
        same_grid = len(ia) == len(ib) and all(
            torch.equal(x.rows.kind, y.rows.kind) and torch.equal(x.rows.view, y.rows.view)
            and torch.equal(x.rows.row, y.rows.row) and torch.equal(x.rows.col, y.rows.col)
            for x, y in zip(ia, ib))
        if not same_grid:
            raise LayoutError(f"cannot patch: example {e}'s vision tokens cover different grid "
                              "cells in the two batches (same token count, different image "
                              "shape: token i sits at another row/col and position id); build "
                              "pairs with the same image sizes")


def token_roles(batch: MultimodalBatch, example: int) -> list[Role | None]:
    """The role of each position of an example (None for padding)."""
    mask = batch.attention_mask[example].bool().tolist()
    anchor = int(batch.query_positions[example][0])
    roles: list[Role | None] = [("text", p - anchor) if m else None for p, m in enumerate(mask)]
    for img in batch.layout.images[example]:
        rows = img.rows
        for j, p in enumerate(img.positions.tolist()):
            v = int(rows.view[j])
            view = rows.views[v].name if v >= 0 else "structural"
            roles[p] = ("image", img.image_index, view, int(rows.row[j]), int(rows.col[j]))
    return roles


def position_groups(batch: MultimodalBatch) -> list[tuple[str, list[Tensor]]]:
    """(label, positions of each example): vision tokens per region (evidence, each distractor,
    other vision tokens), then each text token by its offset from the first answer-predicting
    position (so prompts of different lengths line up), in sequence order."""
    groups: list[tuple[str, list[Tensor]]] = []
    region_sets: list[dict[str, Tensor]] = []
    for e in range(len(batch)):
        vision = batch.layout.vision_positions(e).cpu()
        taken = torch.zeros(batch.seq_len, dtype=torch.bool)
        sets: dict[str, Tensor] = {}
        if batch.boxes and batch.boxes[e]:
            sets["evidence"] = batch.evidence_positions(e).cpu()
            taken[sets["evidence"]] = True
        for i, d in enumerate(batch.distractor_positions(e)):
            d = d.cpu()[~taken[d.cpu()]]
            sets[f"distractor {i}"] = d
            taken[d] = True
        sets["other vision"] = vision[~taken[vision]]
        region_sets.append(sets)
    labels = list(dict.fromkeys(k for sets in region_sets for k in sets))
    for label in labels:
        per = [sets.get(label, torch.zeros(0, dtype=torch.long)) for sets in region_sets]
        if any(len(p) for p in per):
            groups.append((label, per))
    text: dict[int, list[Tensor]] = {}
    for e in range(len(batch)):
        for p, role in enumerate(token_roles(batch, e)):
            if role is not None and role[0] == "text":
                text.setdefault(role[1], [torch.zeros(0, dtype=torch.long)] * len(batch))
                text[role[1]] = [t if i != e else torch.tensor([p])
                                 for i, t in enumerate(text[role[1]])]
    for offset in sorted(text):
        groups.append((f"text {offset:+d}", text[offset]))
    return groups


def index_pairs(per_example: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(example index, position) pairs for advanced indexing."""
    ex = torch.cat([torch.full((len(p),), e, dtype=torch.long) for e, p in enumerate(per_example)])
    return ex, torch.cat(per_example).long()


def image_features(model: Any, batch: MultimodalBatch) -> Any | None:
    """The batch's image encoder outputs (vision tower + projector, as the HF model's
    ``get_image_features`` returns them), recorded from one forward; None when the model has no
    such method or the batch no image."""
    inner = getattr(getattr(model, "hf_model", None), "model", None)
    fn = getattr(inner, "get_image_features", None)
    if fn is None or batch.inputs.get("pixel_values") is None:
        return None
    if batch.inputs.get("pixel_values_videos") is not None:
        return None  # HF takes encoder outputs only in place of ALL pixel inputs: run the tower
    got: dict[str, Any] = {}

    def record(*args: Any, **kw: Any) -> Any:
        got["out"] = fn(*args, **kw)
        return got["out"]

    inner.get_image_features = record
    try:
        with torch.no_grad():
            model(batch, return_type=None)
    finally:
        del inner.get_image_features
    return got.get("out")


def repeat_image_features(features: Any, k: int) -> Any:
    """Image encoder outputs for ``repeat_batch(batch, k)``: per-image sequences repeated k
    times, tensors (images or their tokens first) concatenated k times — copy-major, as
    ``repeat_batch`` orders images."""
    def rep(v: Any) -> Any:
        if isinstance(v, Tensor):
            return torch.cat([v] * k)
        if isinstance(v, (list, tuple)):
            if all(isinstance(e, Tensor) for e in v):  # one entry per image
                return list(v) * k
            return [rep(e) for e in v]  # e.g. per layer, then per image (deepstack)
        return v
    return type(features)(**{name: rep(v) for name, v in features.items()
                             if name not in ("hidden_states", "attentions")})


def stacked(model: Any, batch: MultimodalBatch, k: int,
             features: Any | None) -> tuple[MultimodalBatch, dict[str, Any]]:
    """``repeat_batch(batch, k)`` and forward kwargs that hand it ``features`` (the vision
    tower then does not run again)."""
    big = repeat_batch(batch, k)
    if features is None:
        return big, {}
    inputs = {n: t for n, t in big.inputs.items() if n != "pixel_values"}
    return replace(big, inputs=inputs), {
        "mm_encoder_outputs": {"image": repeat_image_features(features, k)}}


def sweep(
    model: Any, target: MultimodalBatch, metric: Metric, jobs: Sequence[Sequence[tuple[str, Edit]]],
    *, per_forward: int, reuse_vision: bool = True, progress: bool = False, desc: str = "",
) -> Float[Tensor, "job batch"]:
    """The metric of the target run under each job (a list of (hook name, in-place edit of
    that copy's rows)), ``per_forward`` jobs per forward as stacked copies of the target that
    reuse its image features. Equal to running the jobs one forward each."""
    B = len(target)
    per_forward = max(1, int(per_forward))
    features = image_features(model, target) if reuse_vision and per_forward > 1 else None
    out = []
    for start in tqdm(range(0, len(jobs), per_forward), disable=not progress, desc=desc):
        chunk = jobs[start:start + per_forward]
        big, extra = stacked(model, target, len(chunk), features)
        by_name: dict[str, list[tuple[int, Edit]]] = {}
        for i, job in enumerate(chunk):
            for name, edit in job:
                by_name.setdefault(name, []).append((i, edit))

        def hook_for(name: str) -> Callable:
            def hook(x: Tensor, hook: Any) -> Tensor:
                x = x.clone()
                for i, edit in by_name[name]:
                    edit(x[i * B:(i + 1) * B])
                return x
            return hook

        with torch.no_grad():
            logits = model.run_with_hooks(big, fwd_hooks=[(n, hook_for(n)) for n in by_name],
                                          logits_to_keep=logits_to_keep(metric, big), **extra)
        out.append(metric(logits, big).float().view(len(chunk), B).cpu())
    return torch.cat(out)
