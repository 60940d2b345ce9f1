"""``corelens score``: every head's scores (RAM & co.) on a JSONL set -> HeadScores JSON;
data-parallel under ``torchrun`` (``torchrun --nproc_per_node N -m corelens score ...``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corelens.cli.ranks import add_rank_arguments, rank_session
from corelens.data.loaders import load_jsonl
from corelens.scores import registry
from corelens.scores.ram import RamParams, score_all


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score every head (RAM & co.) -> HeadScores JSON; "
                       "data-parallel under torchrun")
    p.add_argument("--model", required=True, help="model folder (offline) or hub id")
    p.add_argument("--data", required=True, help="grounded examples, corelens JSONL "
                   "(corelens.load_jsonl)")
    p.add_argument("--out", required=True, help="output JSON: the --metric HeadScores, or with "
                   "--metric all a {score: HeadScores dict} JSON")
    p.add_argument("--metric", default="ram", choices=[*registry.names(), "all"],
                   help="a registered score (corelens.scores.registry), or all")
    p.add_argument("--batch-size", type=int, default=8, help="examples per global batch")
    p.add_argument("--tau", type=float, default=RamParams.tau)
    p.add_argument("--query", default=RamParams.query, choices=["answer", "last_prompt"])
    p.add_argument("--mass-floor", type=float, default=RamParams.mass_floor)
    p.add_argument("--dataset", default=None, help="dataset name recorded in the scores "
                   "(default: the data file's name)")
    add_rank_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score every head; rank 0 writes ``--out``."""
    with rank_session(args) as (model, world):
        examples = load_jsonl(args.data)
        params = RamParams(tau=args.tau, query=args.query, mass_floor=args.mass_floor,
                           kang_entropy=args.metric in ("kang_spatial_entropy", "all"))
        result = score_all(
            model, examples, batch_size=args.batch_size, params=params,
            partial=args.partial if args.partial is not None else f"{args.out}.partial",
            dataset=args.dataset if args.dataset is not None else Path(args.data).name,
            progress=not args.no_progress)
        if result is None:  # not rank 0
            return 0
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.metric == "all":
            out.write_text(json.dumps({k: v.to_dict() for k, v in result.items()}, indent=1))
        elif args.metric not in result:
            print(f"score {args.metric!r} was not computed (no distractor boxes?); "
                  f"have: {sorted(result)}", file=sys.stderr)
            return 2
        else:
            result[args.metric].save(out)
        print(f"wrote {out} ({len(examples)} examples, {world} rank(s))")
    return 0
