"""The two retrieval stages of ``toy-llava-2hop``, measured with plain HF hooks (as
``corelens.zoo.reference``) and corelens's path patching.

"what color is left of the <shape>": the answer is the colour of the object in the cell left of
the anchor (the object of that shape). The vision tokens are patch-local, so the hop from the
anchor to its neighbour has to happen in the decoder. Stage 1: heads at the anchor's image rows
attend to the target (its left neighbour, earlier in raster order); stage 2: heads at the
answer row attend to the anchor and read what stage 1 wrote there.

``bench/two_hop_analysis.py`` prints these measurements; ``tests/test_toy_claims.py`` asserts
them, with heads chosen on one held-out set and measured on another.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import Any

import torch

from corelens.interventions.patching import path_patch, prepare_pair
from corelens.zoo.reference import replace_layer_outputs, score
from corelens.zoo.scenes import SceneTask, recolor_target


def only(task: SceneTask, qtype: str, pairs: int | None = 1) -> SceneTask:
    """``task`` asking only ``qtype`` questions; relation scenes with ``pairs`` distractor
    pairs (None: the other objects fall where they may)."""
    return dataclasses.replace(task, question_types=(qtype,), question_weights=None,
                               distractor_pairs=pairs)


def with_anchor_as_evidence(ex: Any) -> Any:
    """The same relation example with the anchor (its first distractor) as the evidence box."""
    anchor, *rest = ex.distractors
    return dataclasses.replace(ex, boxes=[anchor], distractors=list(ex.boxes) + rest,
                               id=f"{ex.id}-anchor")


def zero_attention_rows(model: Any, layer: int, rows: torch.Tensor
                        ) -> AbstractContextManager[None]:
    """Zero one decoder layer's attention output at the positions ``rows`` ([b, T] bool)."""
    return replace_layer_outputs(model, [layer], lambda out: out.masked_fill(rows[..., None], 0),
                                 lambda out: out)


def score_rows_zeroed(model: Any, batches: list, layer: int, text: bool = False) -> float:
    """Accuracy with ``layer``'s attention output zeroed at the image rows (``text``: at the
    other, valid rows instead: the prompt words and the answer row)."""
    good = 0
    for b in batches:
        vision = b.layout.vision_mask().bool()
        rows = (b.attention_mask.bool() & ~vision) if text else vision
        with zero_attention_rows(model, layer, rows):
            good += score(model, [b])[0] * len(b)
    return good / sum(len(b) for b in batches)


@torch.no_grad()
def stage_attention(model: Any, batches: list) -> dict[str, torch.Tensor]:
    """Per head [L, H], mean over the relation examples (eager attention):

    - ``anchor_to_target``: mass from the anchor's tokens (mean over its rows) on the target's;
    - ``anchor_to_other``: the same on another object (mean over the scene's other objects);
    - ``answer_to_anchor`` / ``answer_to_target``: mass from the answer-predicting row."""
    out: dict[str, Any] = dict.fromkeys(
        ("anchor_to_target", "anchor_to_other", "answer_to_anchor", "answer_to_target"), 0.0)
    n = 0
    for b in batches:
        att = torch.stack(model(input_ids=b.input_ids, **b.model_kwargs(),
                                output_attentions=True).attentions, 1)  # [b, L, H, T, T]
        for e in range(len(b)):
            tgt = b.evidence_positions(e)
            anchor, *others = b.distractor_positions(e)
            rows = att[e][:, :, anchor]  # [L, H, |anchor|, T]
            out["anchor_to_target"] += rows[..., tgt].sum(-1).mean(-1)
            if others:
                out["anchor_to_other"] += torch.stack(
                    [rows[..., o].sum(-1).mean(-1) for o in others]).mean(0)
            q = int(b.query_positions[e][0])
            out["answer_to_anchor"] += att[e][:, :, q, anchor].sum(-1)
            out["answer_to_target"] += att[e][:, :, q, tgt].sum(-1)
            n += 1
    return {k: v / n for k, v in out.items()}


def argmax_head(scores: torch.Tensor, min_layer: int = 0) -> tuple[int, int]:
    """The (layer, head) of the largest score [L, H] in layers >= ``min_layer``."""
    s = scores.clone()
    s[:min_layer] = -1
    i = int(s.argmax())
    return i // s.shape[1], i % s.shape[1]


def stage_heads(att: dict[str, torch.Tensor]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stage 1, stage 2): the head whose anchor rows attend most to the target, and the head
    of a later layer whose answer row attends most to the anchor (``stage_attention``)."""
    s1 = argmax_head(att["anchor_to_target"])
    return s1, argmax_head(att["answer_to_anchor"], min_layer=s1[0] + 1)


def path_effects(model: Any, examples: list, colors: tuple[str, ...], stage1: tuple[int, int],
                 stage2: tuple[int, int]) -> dict[str, float]:
    """Noising path patching (``corelens.interventions.patching.path_patch`` on the
    ``HookedMLLM``): the clean run is the target, the source has the target object recoloured
    (``scenes.recolor_target``). Each value is the fraction of the clean-minus-corrupted logit
    difference that the stage-1 head's output moves along one path (1 = as much as the whole
    corrupted run): directly to the logits, into the stage-2 head's values / keys / queries, and
    into the values of every head after stage 1; each with the MLPs frozen (only the direct
    path from the head to the receivers) and recomputed (also through the MLPs between them)."""
    corrupted = []
    for i, ex in enumerate(examples):
        options = [c for c in colors if c != ex.answer]
        corrupted.append(recolor_target(ex, options[i % len(options)]))
    pair = prepare_pair(model, examples, corrupted)
    metric = pair.logit_diff
    with torch.no_grad():
        clean = float(metric(model(pair.clean), pair.clean).mean())
        corrupt = float(metric(model(pair.corrupted), pair.corrupted).mean())

    def moved(receivers: Any, freeze: bool) -> float:
        value = path_patch(model, pair.corrupted, pair.clean, metric, [stage1], receivers,
                           freeze_mlps=freeze)
        return round((clean - value) / (clean - corrupt), 3)

    (l1, h1), (l2, h2) = stage1, stage2
    later = [(layer, h, "v") for layer in range(l1 + 1, model.cfg.n_layers)
             for h in range(model.cfg.n_heads)]
    paths = {"logits (direct)": "logits", f"L{l2}H{h2} values": [(l2, h2, "v")],
             f"L{l2}H{h2} keys": [(l2, h2, "k")], f"L{l2}H{h2} queries": [(l2, h2, "q")],
             f"values of all heads in layers > {l1}": later}
    out = {"logit_diff_clean": round(clean, 3), "logit_diff_corrupted": round(corrupt, 3)}
    for freeze, how in ((True, "MLPs frozen"), (False, "MLPs recomputed")):
        for label, receivers in paths.items():
            out[f"L{l1}H{h1} -> {label}, {how}"] = moved(receivers, freeze)
    return out
