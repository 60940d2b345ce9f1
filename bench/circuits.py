"""Circuit discovery, held out (issue #21): per model, every method ranks the edges of the
graph (embeddings, heads, MLPs, logits) on a discovery split of (clean, corrupted) pairs; the
ranking is scored on the evaluation split by its faithfulness curve (MIB's CPR, higher is
better, and CMD, 0 is best; patching ablation with the paired corrupted run), and where the
circuit is known (the planted model) by recall / precision of its edges at the known size.

Models: the planted two-layer circuit (``tests/planted_circuit.py``: evidence colour ->
L0H2 -> L1's KV head 0 value -> L1H1 -> logits; pairs red vs green evidence, each scene with
random distractor cells, seeded) on every planted family (``planted``: LLaVA;
``planted-<family>``: every other family in ``planted_circuit.VARIANTS``), the shipped toy
models (pairs: the queried object recoloured, ``report.toy_pairs``, scenes drawn outside the
training seeds), and
``toy-llava-2hop`` when the zoo has it.

    python bench/circuits.py [--pairs 24] [--models planted,planted-qwen2_5_vl,toy-llava]
                             [--methods ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from corelens import HookedMLLM, zoo
from corelens.interventions.discovery import METHODS, circuit_benchmark
from corelens.report import toy_pairs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import planted_circuit as pc  # noqa: E402  (tests/, on the path just above)

# "planted" is the LLaVA variant; "planted-<family>" every other (pc.VARIANTS)
PLANTED = {"planted": "llava"} | {f"planted-{f}": f for f in pc.VARIANTS if f != "llava"}


def load(name: str, n_pairs: int, seed: int, folder: str):
    if name in PLANTED:
        pc.build_planted_circuit(folder, PLANTED[name])
        model = HookedMLLM.from_pretrained(folder)
        return model, pc.grounded_pairs(PLANTED[name], n_pairs, seed), pc.KNOWN
    model = zoo.load(name)
    return model, toy_pairs(zoo.examples(name, n_pairs, seed=seed), zoo.task(name)), None


def main() -> None:
    ap = argparse.ArgumentParser()
    default = [*PLANTED, "toy-llava"] + [m for m in ("toy-llava-2hop",) if m in zoo.names()]
    ap.add_argument("--models", default=",".join(default))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--data-seed", type=int, default=41, help="scenes (outside training seeds)")
    ap.add_argument("--seed", type=int, default=0, help="the discovery / evaluation split")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            model, pairs, known = load(name, args.pairs, args.data_seed, folder)
            t0 = time.perf_counter()
            bench = circuit_benchmark(model, pairs, args.methods.split(","), seed=args.seed,
                                      known=known)
        print(f"\n== {name}: {len(bench.discovery)} discovery / {len(bench.evaluation)} "
              f"evaluation pairs, {bench.meta['n_graph_edges']} edges, "
              f"{time.perf_counter() - t0:.0f} s")
        print(bench.table())
        report[name] = bench.to_dict()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
