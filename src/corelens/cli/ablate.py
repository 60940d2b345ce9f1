"""``corelens ablate``: the ablation curve (top-k vs random-k vs bottom-k heads) -> JSON;
data-parallel under ``torchrun`` (``torchrun --nproc_per_node N -m corelens ablate ...``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from corelens.cli.ranks import add_rank_arguments, rank_session
from corelens.data.loaders import load_jsonl
from corelens.interventions.ablation import ablation_curve
from corelens.scores.head_scores import HeadScores


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="ablation curve (top vs random vs bottom) -> JSON; "
                       "data-parallel under torchrun")
    p.add_argument("--model", required=True, help="model folder (offline) or hub id")
    p.add_argument("--data", required=True, help="grounded examples, corelens JSONL")
    p.add_argument("--scores", required=True, help="HeadScores JSON to rank heads by")
    p.add_argument("--out", required=True, help="output JSON (AblationCurve.save)")
    p.add_argument("--fracs", default="0.02,0.05,0.1,0.2", help="comma-separated fractions")
    p.add_argument("--seeds", type=int, default=8, help="random-head draws per fraction")
    p.add_argument("--baselines", default="random,bottom")
    p.add_argument("--method", default="zero", choices=["zero", "mean", "resample", "knockout"])
    p.add_argument("--batch-size", type=int, default=16)
    add_rank_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The (job, batch) units dealt over the ranks; rank 0 writes ``--out``."""
    with rank_session(args) as (model, world):
        curve = ablation_curve(
            model, load_jsonl(args.data), HeadScores.load(args.scores),
            fracs=[float(f) for f in args.fracs.split(",")],
            baselines=[b for b in args.baselines.split(",") if b],
            seeds=tuple(range(args.seeds)), method=args.method, batch_size=args.batch_size,
            partial=args.partial if args.partial is not None else f"{args.out}.partial",
            progress=not args.no_progress)
        if curve is not None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            curve.save(args.out)
            print(f"wrote {args.out} ({world} rank(s))")
    return 0
