"""``corelens demo``: the whole study on a shipped toy model -> report.html."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from corelens import zoo
from corelens.report import run_study, toy_pairs


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole study on the shipped toy model -> report.html")
    p.add_argument("--out", default="corelens-demo", help="output folder")
    p.add_argument("--model", default="toy-llava", help="a shipped toy model (zoo list)")
    p.add_argument("--n", type=int, default=128, help="examples in each of the scoring "
                   "and the evaluation set (two disjoint held-out sets)")
    p.add_argument("--pairs", type=int, default=16, help="clean/corrupted pairs to patch")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The whole study on the shipped toy model: ``OUT/report.html`` and ``OUT/summary.json``."""
    torch.set_num_threads(args.threads)
    model = zoo.load(args.model)
    # two disjoint held-out sets: heads are chosen on the first, every claim measured on the second
    scoring = zoo.examples(args.model, args.n, seed=args.seed)
    evaluation = zoo.examples(args.model, args.n, seed=args.seed + 1)
    pairs = toy_pairs(evaluation[: args.pairs], zoo.task(args.model))
    # the toy image is 64 tokens: a window of 8 and 2 sinks keep streaming heads really local
    summary = run_study(model, scoring, args.out, eval_examples=evaluation, pairs=pairs,
                        title=f"corelens demo: {args.model}",
                        accel={"frac": 0.125, "n_sink": 2, "window": 8},
                        extra={"model": args.model, "random_model": False}, sources={
                            "scoring": f"zoo.examples({args.model!r}, {args.n}, "
                                       f"seed={args.seed})",
                            "evaluation": f"zoo.examples({args.model!r}, {args.n}, "
                                          f"seed={args.seed + 1})"})
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'report.html'} and {Path(args.out) / 'summary.json'}")
    return 0
