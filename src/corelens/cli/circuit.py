"""``corelens circuit``: rank the edges of a model's graph with several methods on a discovery
split of example pairs and score each ranking on a held-out evaluation split by its
faithfulness curve (MIB's CPR / CMD)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from corelens import zoo
from corelens.core.model import HookedMLLM
from corelens.data.loaders import load_jsonl
from corelens.errors import InputError
from corelens.interventions.circuit import MIB_FRACTIONS
from corelens.interventions.discovery import METHODS, circuit_benchmark
from corelens.report import toy_pairs
from corelens.zoo.scenes import make_examples


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("circuit", help="circuit discovery held out: rank edges (exact edge "
                       "patching, EAP, EAP-IG, ACDC, random) on a discovery split, score them "
                       "by faithfulness curves (CPR / CMD) on an evaluation split")
    p.add_argument("--model", required=True, help="model folder, hub id or zoo model name")
    p.add_argument("--clean", help="JSONL of clean examples (line i pairs with line i of "
                   "--corrupted)")
    p.add_argument("--corrupted", help="JSONL of corrupted partners, same layouts")
    p.add_argument("--zoo-pairs", type=int, default=None, help="instead of JSONL: N scene "
                   "pairs of a zoo model's task (the queried object recoloured), drawn from "
                   "--data-seed (outside the model's training seeds)")
    p.add_argument("--zoo-question", default=None, help="with --zoo-pairs: only this "
                   "question type of the model's task (e.g. relation for toy-llava-2hop)")
    p.add_argument("--data-seed", type=int, default=41)
    p.add_argument("--method", default=",".join(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--discovery-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="split (and random ranking) seed")
    p.add_argument("--ablation", choices=["patching", "mean", "zero"], default="patching")
    p.add_argument("--steps", type=int, default=5, help="eap-ig interpolation steps")
    p.add_argument("--acdc-threshold", type=float, default=0.02,
                   help="ACDC threshold, as a fraction of the clean - corrupted metric gap")
    p.add_argument("--out", default="circuit.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Split the pairs (seeded), rank edges on the discovery split with each method, print
    CPR / CMD of each ranking on the evaluation split; write both splits and every curve."""
    torch.set_num_threads(args.threads)
    name = args.model
    model = zoo.load(name) if name in zoo.names() else HookedMLLM.from_pretrained(name)
    if args.zoo_pairs:
        if name not in zoo.names():
            raise InputError("--zoo-pairs needs a zoo model (corelens zoo list); give --clean "
                             "and --corrupted JSONL for other models")
        task = zoo.task(name)
        if args.zoo_question:
            if args.zoo_question not in task.question_types:
                raise InputError(f"--zoo-question {args.zoo_question!r}: {name}'s task asks "
                                 f"{', '.join(task.question_types)}")
            task = replace(task, question_types=(args.zoo_question,), question_weights=None)
        pairs = toy_pairs(make_examples(task, args.zoo_pairs, seed=args.data_seed), task)
    elif args.clean and args.corrupted:
        clean, corrupted = load_jsonl(args.clean), load_jsonl(args.corrupted)
        if len(clean) != len(corrupted):
            raise InputError(f"--clean has {len(clean)} examples, --corrupted {len(corrupted)}:"
                             " they pair line by line")
        pairs = list(zip(clean, corrupted))
    else:
        raise InputError("give --clean and --corrupted JSONL files, or --zoo-pairs N")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bench = circuit_benchmark(model, pairs, methods, discovery_fraction=args.discovery_fraction,
                              seed=args.seed, ablation=args.ablation, steps=args.steps,
                              acdc_threshold=args.acdc_threshold, fractions=MIB_FRACTIONS,
                              progress=not args.no_progress)
    print(f"{len(bench.discovery)} discovery pairs, {len(bench.evaluation)} evaluation pairs, "
          f"{bench.meta['n_graph_edges']} edges, ablation {args.ablation}")
    print(bench.table())
    out = {"model": name, **bench.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0
