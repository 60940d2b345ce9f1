"""The ``corelens`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """The whole study on the shipped toy model: ``OUT/report.html`` and ``OUT/summary.json``."""
    import torch

    from corelens import zoo
    from corelens.report import run_study, toy_pairs

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


def _report(args: argparse.Namespace) -> int:
    """The study on any supported model and a JSONL file of grounded examples."""
    import torch

    from corelens import HookedMLLM, load_jsonl
    from corelens.report import run_study

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


def _patch(args: argparse.Namespace) -> int:
    """Causal analysis of every head on example pairs, metric: logit(clean answer) -
    logit(corrupted answer) at the answer position. Line i of --clean and of --corrupted form
    a pair, each line with its own answer; their layouts must match and both runs
    teacher-force the clean answer (``patching.prepare_pair``). ``--method exact`` patches each
    head (batched sweep); ``atp`` / ``atp*`` estimate the same with gradients (``--node``);
    ``eap`` / ``eap-ig`` score every edge between embeddings, heads, MLPs and the logits."""
    import torch

    from corelens import HookedMLLM, load_jsonl
    from corelens.attribution import atp_star, attribute_heads, edge_attribution
    from corelens.patching import patch_heads, prepare_pair

    torch.set_num_threads(args.threads)
    model = HookedMLLM.from_pretrained(args.model, device=args.device)
    pair = prepare_pair(model, load_jsonl(args.clean), load_jsonl(args.corrupted))
    source, target = pair.source_target(args.direction)
    metric = pair.logit_diff
    with torch.no_grad():
        base = float(metric(model(target), target).mean())
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


def _accelerate(args: argparse.Namespace) -> int:
    """Accuracy and wall time of full attention, CoRe hybrid, random hybrid and FastV."""
    import torch

    from corelens.accel import main_accelerate

    torch.set_num_threads(args.threads)
    main_accelerate(args)
    return 0


def _families(args: argparse.Namespace) -> int:
    from corelens.families import FAMILIES

    for name, fam in sorted(FAMILIES.items()):
        print(f"{name:20s} {', '.join(fam.hf_architectures)}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    import copy

    from corelens.zoo.train import RECIPES, train

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


def _zoo_list(args: argparse.Namespace) -> int:
    from corelens import zoo

    for name in zoo.names():
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="corelens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole study on the shipped toy model -> report.html")
    demo.add_argument("--out", default="corelens-demo", help="output folder")
    demo.add_argument("--model", default="toy-llava", help="a shipped toy model (zoo list)")
    demo.add_argument("--n", type=int, default=128, help="examples in each of the scoring "
                      "and the evaluation set (two disjoint held-out sets)")
    demo.add_argument("--pairs", type=int, default=16, help="clean/corrupted pairs to patch")
    demo.add_argument("--seed", type=int, default=2026)
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=_demo)
    rep = sub.add_parser("report", help="the whole study on a model + JSONL data -> report.html")
    rep.add_argument("--model", required=True, help="model folder or hub id")
    rep.add_argument("--data", required=True, help="grounded examples (JSONL, docs/data.md)")
    rep.add_argument("--eval-data", default=None, help="a separate JSONL to measure the "
                     "ablation on (default: a seeded half of --data; the other half scores)")
    rep.add_argument("--out", default="corelens-report")
    rep.add_argument("--device", default=None)
    rep.add_argument("--batch-size", type=int, default=16)
    rep.add_argument("--skip-invalid", action="store_true")
    rep.add_argument("--threads", type=int, default=1)
    rep.set_defaults(func=_report)
    patch = sub.add_parser("patch", help="activation patching / attribution (AtP, AtP*, EAP, "
                           "EAP-IG) of every head or edge on example pairs")
    patch.add_argument("--model", required=True, help="model folder or hub id")
    patch.add_argument("--clean", required=True, help="JSONL of clean examples")
    patch.add_argument("--corrupted", required=True, help="JSONL of corrupted partners, "
                       "line by line, same layouts")
    patch.add_argument("--out", default="patching.json")
    patch.add_argument("--direction", choices=["denoise", "noise"], default="denoise",
                       help="denoise: patch clean activations into the corrupted run")
    patch.add_argument("--method", choices=["exact", "atp", "atp*", "eap", "eap-ig"],
                       default="exact", help="exact: activation patching of every head; atp / "
                       "atp*: attribution of every head (atp*: QK fix + GradDrop, a "
                       "magnitude); eap / eap-ig: edge attribution")
    patch.add_argument("--node", choices=["z", "q", "k", "v"], default="z",
                       help="what a head contributes: output z, or its q / k / v input")
    patch.add_argument("--steps", type=int, default=5, help="eap-ig interpolation steps")
    patch.add_argument("--top", type=int, default=20, help="eap: edges listed in top_edges")
    patch.add_argument("--attribution", action="store_true",
                       help="with --method exact: also plain AtP")
    patch.add_argument("--heads-per-forward", type=int, default=8)
    patch.add_argument("--device", default=None)
    patch.add_argument("--threads", type=int, default=1)
    patch.set_defaults(func=_patch)
    acc = sub.add_parser("accelerate", help="CoRe-guided hybrid attention vs full, random "
                         "heads and FastV: accuracy and speed")
    acc.add_argument("--model", required=True, help="folder, hub id or shipped toy model name")
    acc.add_argument("--scores", default="ram", help="HeadScores JSON, or a RAM metric name "
                     "to score heads first")
    acc.add_argument("--data", required=True, help="JSONL, or zoo:N[:SEED] for toy examples")
    acc.add_argument("--score-data", default=None,
                     help="examples to score heads on (JSONL or zoo:N:SEED); default: "
                     "zoo:N//2:SEED+1 with zoo data, else a seeded half of --data (the other "
                     "half is evaluated)")
    for flag, typ in (("--frac", float), ("--n-sink", int), ("--window", int),
                      ("--n-pooled", int), ("--fastv-k", int), ("--fastv-ratio", float),
                      ("--limit", int), ("--seed", int), ("--batch-size", int)):
        acc.add_argument(flag, type=typ, default=None)
    acc.add_argument("--out", default=None)
    acc.add_argument("--threads", type=int, default=1)
    acc.set_defaults(func=_accelerate)
    score = sub.add_parser("score", help="score every head (RAM & co.) -> HeadScores JSON; "
                           "under torchrun with --distributed", add_help=False)
    score.set_defaults(func=None, forward="score")
    ablate = sub.add_parser("ablate", help="ablation curve (top vs random vs bottom) -> JSON; "
                            "under torchrun with --distributed", add_help=False)
    ablate.set_defaults(func=None, forward="ablate")
    fams = sub.add_parser("families", help="list supported model families")
    fams.set_defaults(func=_families)
    zoo = sub.add_parser("zoo", help="the shipped toy models: list them, or train one")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    ztrain = zsub.add_parser("train", help="train a toy model from scratch (CPU; resumable)")
    ztrain.add_argument("--name", default="toy-llava", help="recipe name")
    ztrain.add_argument("--out", required=True, help="output folder (resumes from its ckpt.pt)")
    ztrain.add_argument("--seed", type=int, default=0)
    ztrain.add_argument("--steps", type=int, default=None, help="training steps (recipe default)")
    ztrain.add_argument("--threads", type=int, default=None, help="torch threads")
    ztrain.set_defaults(func=_zoo_train)
    zlist = zsub.add_parser("list", help="list the shipped toy models")
    zlist.set_defaults(func=_zoo_list)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("score", "ablate"):  # their own parsers (corelens.distributed)
        from corelens import distributed

        rest = [a for a in argv[1:] if a != "--distributed"]
        entry = distributed.main_score if argv[0] == "score" else distributed.main_ablation
        return int(entry(rest))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
