"""Compare a re-trained toy model with the shipped one: are the weights bitwise equal, and if
not, does the retrained model behave the same (held-out accuracy, RAM's top heads)?

    corelens zoo train --name toy-llava-deep --out runs/toy-llava-deep --seed 0 --threads 1
    python bench/zoo_rerun.py runs/toy-llava-deep --name toy-llava-deep

Accuracy on ``zoo.examples(name, 256, seed=11)``, RAM on ``zoo.examples(name, 150, seed=1)``:
both held out from the training streams.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from corelens import HookedMLLM, evaluate, zoo
from corelens.scores.head_scores import head_name
from corelens.scores.ram import score_heads


def compare_weights(a: str, b: str) -> dict:
    wa, wb = load_file(a), load_file(b)
    if set(wa) != set(wb):
        return {"same_names": False}
    diffs = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa}
    worst = max(diffs, key=diffs.get)
    return {"same_names": True, "tensors": len(wa),
            "bitwise_equal": sum(torch.equal(wa[k], wb[k]) for k in wa),
            "max_abs_diff": diffs[worst], "max_abs_diff_tensor": worst}


def behaviour(folder: str, name: str) -> dict:
    model = HookedMLLM.from_pretrained(folder)
    acc = evaluate(model, zoo.examples(name, 256, seed=11), progress=False).accuracy
    ram = score_heads(model, zoo.examples(name, 150, seed=1), "ram", progress=False)
    return {"accuracy": acc, "ram_top4": [head_name(h) for h in ram.top(k=4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the retrained model's folder")
    ap.add_argument("--name", required=True, help="the shipped toy model to compare with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shipped = str(zoo.path(args.name))
    print(json.dumps({
        "weights": compare_weights(f"{args.folder}/model.safetensors",
                                   f"{shipped}/model.safetensors"),
        "retrained": behaviour(args.folder, args.name),
        "shipped": behaviour(shipped, args.name),
    }, indent=1))


if __name__ == "__main__":
    main()
