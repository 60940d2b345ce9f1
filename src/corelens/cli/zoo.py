"""``corelens zoo list`` / ``corelens zoo train``: the shipped toy models."""

from __future__ import annotations

import argparse
import copy
import json
import sys

from corelens import zoo
from corelens.zoo.train import RECIPES, train


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the shipped toy models: list them, or train one")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    t = zsub.add_parser("train", help="train a toy model from scratch (CPU; resumable)")
    t.add_argument("--name", default="toy-llava", help="recipe name")
    t.add_argument("--out", required=True, help="output folder (resumes from its ckpt.pt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="training steps (recipe default)")
    t.add_argument("--threads", type=int, default=None, help="torch threads")
    t.set_defaults(func=run_train)
    zsub.add_parser("list", help="list the shipped toy models").set_defaults(func=run_list)


def run_train(args: argparse.Namespace) -> int:
    if args.name not in RECIPES:
        print(f"unknown toy model {args.name!r}; recipes: {', '.join(sorted(RECIPES))}",
              file=sys.stderr)
        return 2
    recipe = copy.deepcopy(RECIPES[args.name])
    if args.threads is not None:
        recipe.threads = args.threads
    log = train(args.name, args.out, seed=args.seed, steps=args.steps, recipe=recipe)
    print(json.dumps({k: log[k] for k in ("name", "seed", "seconds", "final_accuracy")}))
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name in zoo.names():
        print(name)
    return 0
