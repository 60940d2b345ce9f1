"""``corelens patch``: activation patching and attribution of every head or edge on pairs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from corelens.core.evaluate import logits_to_keep
from corelens.core.model import HookedMLLM
from corelens.data.loaders import load_jsonl
from corelens.interventions.attribution import atp_star, attribute_heads, edge_attribution
from corelens.interventions.patching import patch_heads, prepare_pair


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="activation patching / attribution (AtP, AtP*, EAP, "
                       "EAP-IG) of every head or edge on example pairs")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--clean", required=True, help="JSONL of clean examples")
    p.add_argument("--corrupted", required=True, help="JSONL of corrupted partners, "
                   "line by line, same layouts")
    p.add_argument("--out", default="patching.json")
    p.add_argument("--direction", choices=["denoise", "noise"], default="denoise",
                   help="denoise: patch clean activations into the corrupted run")
    p.add_argument("--method", choices=["exact", "atp", "atp*", "eap", "eap-ig"],
                   default="exact", help="exact: activation patching of every head; atp / "
                   "atp*: attribution of every head (atp*: QK fix + GradDrop, a "
                   "magnitude); eap / eap-ig: edge attribution")
    p.add_argument("--node", choices=["z", "q", "k", "v"], default="z",
                   help="what a head contributes: output z, or its q / k / v input")
    p.add_argument("--steps", type=int, default=5, help="eap-ig interpolation steps")
    p.add_argument("--top", type=int, default=20, help="eap: edges listed in top_edges")
    p.add_argument("--attribution", action="store_true",
                   help="with --method exact: also plain AtP")
    p.add_argument("--heads-per-forward", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Causal analysis of every head on example pairs, metric: logit(clean answer) -
    logit(corrupted answer) at the answer position. Line i of --clean and of --corrupted form
    a pair, each line with its own answer; their layouts must match and both runs
    teacher-force the clean answer (``patching.prepare_pair``). ``--method exact`` patches each
    head (batched sweep); ``atp`` / ``atp*`` estimate the same with gradients (``--node``);
    ``eap`` / ``eap-ig`` score every edge between embeddings, heads, MLPs and the logits."""
    torch.set_num_threads(args.threads)
    model = HookedMLLM.from_pretrained(args.model, device=args.device)
    pair = prepare_pair(model, load_jsonl(args.clean), load_jsonl(args.corrupted))
    source, target = pair.source_target(args.direction)
    metric = pair.logit_diff
    with torch.no_grad():
        base = float(metric(model(target, logits_to_keep=logits_to_keep(metric, target)),
                            target).mean())
    out = {"metric": "logit_diff(clean answer, corrupted answer)", "direction": args.direction,
           "method": args.method, "baseline": base}
    if args.method == "exact":
        out["patched"] = patch_heads(model, source, target, metric, node=args.node,
                                     heads_per_forward=args.heads_per_forward,
                                     progress=True).tolist()
        if args.attribution:  # kept for scripts written before --method
            out["attribution"] = attribute_heads(model, source, target, metric,
                                                 node=args.node).tolist()
    elif args.method in ("atp", "atp*"):
        fn = atp_star if args.method == "atp*" else attribute_heads
        out["node"] = args.node
        out["attribution"] = fn(model, source, target, metric, node=args.node).tolist()
    else:
        edges = edge_attribution(model, source, target, metric, method=args.method,
                                 steps=args.steps, progress=True)
        out["edges"] = edges.to_dict()
        out["top_edges"] = [list(e) for e in edges.top(args.top)]
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0
