"""``corelens report``: the whole study on any supported model + a JSONL of grounded examples."""

from __future__ import annotations

import argparse
import json

import torch

from corelens.core.model import HookedMLLM
from corelens.data.loaders import load_jsonl
from corelens.report import run_study


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="the whole study on a model + JSONL data -> report.html")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--data", required=True, help="grounded examples (JSONL, docs/data.md)")
    p.add_argument("--eval-data", default=None, help="a separate JSONL to measure the "
                   "ablation on (default: a seeded half of --data; the other half scores)")
    p.add_argument("--out", default="corelens-report")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model = HookedMLLM.from_pretrained(args.model, device=args.device)
    examples = load_jsonl(args.data, skip_invalid=args.skip_invalid)
    evaluation, sources = None, {}
    if args.eval_data:
        evaluation = load_jsonl(args.eval_data, skip_invalid=args.skip_invalid)
        sources = {"scoring": str(args.data), "evaluation": str(args.eval_data)}
    summary = run_study(model, examples, args.out, eval_examples=evaluation,
                        title=f"corelens report: {args.model}", batch_size=args.batch_size,
                        extra={"model": str(args.model), "data": str(args.data)},
                        sources=sources)
    print(json.dumps(summary, indent=2))
    return 0
