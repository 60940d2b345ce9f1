"""``corelens patch``: activation patching and attribution of every head or edge on pairs, batch
by batch (resumable; data-parallel under ``torchrun --nproc_per_node N -m corelens patch``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corelens.cli.ranks import add_rank_arguments, rank_session
from corelens.data.loaders import load_jsonl
from corelens.interventions.runs import METHODS, patch_pairs


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="activation patching / attribution (AtP, AtP*, EAP, "
                       "EAP-IG) of every head or edge on example pairs; data-parallel under "
                       "torchrun")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--clean", required=True, help="JSONL of clean examples")
    p.add_argument("--corrupted", required=True, help="JSONL of corrupted partners, "
                   "line by line, same layouts")
    p.add_argument("--out", default="patching.json")
    p.add_argument("--direction", choices=["denoise", "noise"], default="denoise",
                   help="denoise: patch clean activations into the corrupted run")
    p.add_argument("--method", choices=METHODS, default="exact",
                   help="exact: activation patching of every head; atp / atp*: attribution "
                   "of every head (atp*: QK fix + GradDrop, a magnitude); eap / eap-ig: edge "
                   "attribution")
    p.add_argument("--node", choices=["z", "q", "k", "v"], default="z",
                   help="what a head contributes: output z, or its q / k / v input")
    p.add_argument("--steps", type=int, default=5, help="eap-ig interpolation steps")
    p.add_argument("--top", type=int, default=20, help="eap: edges listed in top_edges")
    p.add_argument("--attribution", action="store_true",
                   help="with --method exact: also plain AtP")
    p.add_argument("--heads-per-forward", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward batch (a "
                   "unit of the run: resumed and dealt over torchrun ranks)")
    add_rank_arguments(p)
    p.set_defaults(func=run, threads=1)


def run(args: argparse.Namespace) -> int:
    """Causal analysis of every head on example pairs, metric: logit(clean answer) -
    logit(corrupted answer) at the answer position, averaged over all pairs. Line i of --clean
    and of --corrupted form a pair, each line with its own answer; their layouts must match
    and both runs teacher-force the clean answer (``patching.prepare_pair``). ``--method
    exact`` patches each head (batched sweep); ``atp`` / ``atp*`` estimate the same with
    gradients (``--node``); ``eap`` / ``eap-ig`` score every edge between embeddings, heads,
    MLPs and the logits. Rank 0 writes ``--out``."""
    clean, corrupted = load_jsonl(args.clean), load_jsonl(args.corrupted)
    partial = args.partial if args.partial is not None else f"{args.out}.partial"
    with rank_session(args) as (model, world):
        kw = dict(direction=args.direction, node=args.node, steps=args.steps,
                  batch_size=args.batch_size, heads_per_forward=args.heads_per_forward,
                  progress=not args.no_progress)
        res = patch_pairs(model, clean, corrupted, method=args.method, partial=partial, **kw)
        extra = (patch_pairs(model, clean, corrupted, method="atp",
                             partial=f"{partial}.atp", **kw)
                 if args.method == "exact" and args.attribution else None)
        if res is None:  # not rank 0
            return 0
        out = {"metric": "logit_diff(clean answer, corrupted answer)",
               "direction": args.direction, "method": args.method, "node": args.node,
               "n_pairs": res["n_pairs"], "batch_size": args.batch_size,
               "baseline": res["baseline"]}
        if args.method == "exact":
            out["patched"] = res["scores"].tolist()
            if extra is not None:  # kept for scripts written before --method
                out["attribution"] = extra["scores"].tolist()
        elif args.method in ("atp", "atp*"):
            out["attribution"] = res["scores"].tolist()
        else:
            out["edges"] = res["edges"].to_dict()
            out["top_edges"] = [list(e) for e in res["edges"].top(args.top)]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out} ({world} rank(s))")
    return 0
