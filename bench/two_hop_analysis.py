"""The two retrieval stages of toy-llava-2hop, on held-out relation questions.

"what color is left of the <shape>": the answer is the colour of the object in the cell left of
the anchor (the object of that shape). The vision tokens are patch-local, so the hop from the
anchor to its neighbour has to happen in the decoder. Printed (plain HF model, eager attention,
hooks as in ``corelens.zoo.reference``, unless a corelens API is named):

1. accuracy on relation questions: with one distractor pair (another object with an occupied
   left neighbour: the training distribution), none, and objects placed at random; on the
   one-hop ``shape`` questions; with a blank image;
2. ablations on the relation set: each layer zeroed (attention + MLP output), each layer
   mean-ablated (outputs replaced by their mean over the set, per position), layer 0's
   attention zeroed at the image rows only / at the text rows only;
3. RAM (``corelens.scores.ram.score_heads`` on the ``HookedMLLM``): the top heads by mass on the
   target from the answer position, and by mass on the anchor (the same examples with the anchor
   as the evidence box); ``flow_ram`` (multi-hop RAM) of every head beside plain RAM's;
4. attention: per head, the mass that the anchor cell's tokens put on the target cell (vs the
   mean over the other objects), and the mass that the answer row puts on the anchor / target;
5. path patching (``corelens.interventions.patching.path_patch``): the target recoloured
   (``scenes.recolor_target``) is the corrupted run; the stage-1 head's output taken from it
   reaches the logits through the stage-2 head's values (fraction of the logit difference
   moved), not directly.

Heads are chosen on one held-out set (seed ``--seed``), measured on another (``--seed + 1``).

    python bench/two_hop_analysis.py [--name toy-llava-2hop] [--n 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from corelens import HookedMLLM, flow_ram, zoo
from corelens.scores.ram import score_heads
from corelens.zoo.reference import (
    _batches,
    _layers,
    load_plain,
    replace_layer_outputs,
    score,
    zero_layers,
)
from corelens.zoo.scenes import SceneTask, blank_like, make_examples
from corelens.zoo.two_hop import (
    only,
    path_effects,
    score_rows_zeroed,
    stage_attention,
    stage_heads,
    with_anchor_as_evidence,
)


def folder_of(name: str) -> Path:
    return Path(name) if Path(name).is_dir() else zoo.path(name)


@torch.no_grad()
def layer_means(model: Any, batches: list, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean attention and MLP outputs of ``layer`` over the examples, per position [T, d]
    (the examples must share one layout: relation prompts of one length)."""
    acc: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    block = _layers(model)[layer]
    hs = [block.self_attn.register_forward_hook(
              lambda m, a, o: acc["attn"].append(o[0].sum(0))),
          block.mlp.register_forward_hook(lambda m, a, o: acc["mlp"].append(o.sum(0)))]
    n = 0
    for b in batches:
        model(input_ids=b.input_ids, **b.model_kwargs())
        n += len(b)
    for h in hs:
        h.remove()
    return sum(acc["attn"]) / n, sum(acc["mlp"]) / n


def fmt_heads(scores: Any, k: int) -> list[str]:
    return [f"L{l}H{h} {scores[(l, h)]:.3f}" for l, h in scores.rank()[:k]]


def ablations(hf: Any, relation: list, shape: list) -> dict[str, float]:
    """Accuracy on the relation (and one-hop shape) batches with parts of each layer removed."""
    out: dict[str, float] = {}
    for layer in range(len(_layers(hf))):
        with zero_layers(hf, [layer]):
            out[f"layer {layer} zeroed"] = round(score(hf, relation)[0], 3)
        attn_mean, mlp_mean = layer_means(hf, relation, layer)
        with replace_layer_outputs(hf, [layer], attn_mean.expand_as, mlp_mean.expand_as):
            out[f"layer {layer} mean-ablated"] = round(score(hf, relation)[0], 3)
        out[f"layer {layer} attention zeroed at image rows"] = round(
            score_rows_zeroed(hf, relation, layer), 3)
        out[f"layer {layer} attention zeroed at image rows, shape questions"] = round(
            score_rows_zeroed(hf, shape, layer), 3)
        out[f"layer {layer} attention zeroed at text rows"] = round(
            score_rows_zeroed(hf, relation, layer, text=True), 3)
    return out


def attention_report(att: dict[str, torch.Tensor], s1: tuple[int, int], s2: tuple[int, int]
                     ) -> dict[str, Any]:
    def r(key: str, head: tuple[int, int]) -> float:
        return round(float(att[key][head]), 3)

    def per_layer(key: str) -> list[float]:
        return [round(float(v), 3) for v in att[key].amax(1)]

    return {"stage 1: anchor rows -> target": r("anchor_to_target", s1),
            "stage 1: anchor rows -> another object (mean)": r("anchor_to_other", s1),
            "stage 2: answer row -> anchor": r("answer_to_anchor", s2),
            "stage 2: answer row -> target": r("answer_to_target", s2),
            "anchor rows -> target, per layer (max over heads)": per_layer("anchor_to_target"),
            "answer row -> anchor, per layer (max over heads)": per_layer("answer_to_anchor"),
            "answer row -> target, per layer (max over heads)": per_layer("answer_to_target")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="toy-llava-2hop", help="shipped name or a folder")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    folder = folder_of(args.name)
    task = SceneTask.load(folder / "task.json")
    hf, proc = load_plain(folder)
    choose, measure = args.seed, args.seed + 1
    score_set = make_examples(only(task, "relation"), args.n, seed=choose)
    eval_set = make_examples(only(task, "relation"), args.n, seed=measure)
    shape_set = make_examples(only(task, "shape"), args.n, seed=measure)
    report: dict[str, Any] = {"model": str(args.name), "n": args.n,
                              "seeds": {"choose heads": choose, "measure": measure}}

    def batches(exs: list) -> list:
        return _batches(hf, proc, exs, 64)

    def acc(exs: list) -> float:
        return round(score(hf, batches(exs))[0], 3)

    report["accuracy"] = {
        "relation, 1 distractor pair (as trained)": acc(eval_set),
        "relation, no distractor pair": acc(make_examples(only(task, "relation", 0), args.n,
                                                          seed=measure)),
        "relation, objects placed at random": acc(make_examples(only(task, "relation", None),
                                                                args.n, seed=measure)),
        "shape (one hop)": acc(shape_set),
        "relation, blank image": acc([blank_like(e) for e in eval_set]),
    }
    eval_b = batches(eval_set)
    report["ablation (relation, 1 pair)"] = ablations(hf, eval_b, batches(shape_set))

    model = HookedMLLM.from_pretrained(str(folder))
    ram = score_heads(model, score_set, "ram", batch_size=64, progress=False)
    ram_anchor = score_heads(model, [with_anchor_as_evidence(e) for e in score_set], "ram",
                             batch_size=64, progress=False)
    report["RAM (answer row -> target)"] = fmt_heads(ram, 4)
    report["RAM top 5% layers"] = sorted({l for l, _ in ram.top(frac=0.05)})
    report["RAM on the anchor (answer row -> anchor)"] = fmt_heads(ram_anchor, 4)
    for mix in ("norms", "rollout"):
        flow = flow_ram(model, score_set, batch_size=64, mix=mix, progress=False)
        report[f"flow_ram, mix={mix} (multi-hop RAM, answer -> target)"] = fmt_heads(flow, 8)
    report["RAM, all heads"] = fmt_heads(ram, 8)

    s1, s2 = stage_heads(stage_attention(hf, batches(score_set)))
    report["stage heads (chosen on the first set)"] = {"stage 1": f"L{s1[0]}H{s1[1]}",
                                                       "stage 2": f"L{s2[0]}H{s2[1]}"}
    report["attention (measured on the second set)"] = attention_report(
        stage_attention(hf, eval_b), s1, s2)
    report["path patching (second set, first 128 examples)"] = path_effects(
        model, eval_set[:128], task.colors, s1, s2)
    report["path patching, each layer-0 head -> later values, MLPs recomputed"] = {
        f"L0H{h}": path_effects(model, eval_set[:128], task.colors, (0, h), s2)[
            f"L0H{h} -> values of all heads in layers > 0, MLPs recomputed"]
        for h in range(model.cfg.n_heads)}

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
