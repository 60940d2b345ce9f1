"""``corelens accelerate``: accuracy and wall time of full attention, the CoRe hybrid, random
KV heads at the same budget, and FastV, on held-out examples (heads scored on another set)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import torch

from corelens import zoo
from corelens.accel import FastV, HybridAttention
from corelens.core.evaluate import evaluate
from corelens.core.intervention import Intervention
from corelens.core.model import HookedMLLM
from corelens.data.examples import check_disjoint, split_examples
from corelens.data.loaders import load_jsonl
from corelens.errors import InputError
from corelens.heads import head_name, kv_head_name
from corelens.scores import registry
from corelens.scores.head_scores import HeadScores
from corelens.scores.ram import score_heads


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accelerate", help="CoRe-guided hybrid attention vs full, random "
                       "heads and FastV: accuracy and speed")
    p.add_argument("--model", required=True, help="folder, hub id or shipped toy model name")
    p.add_argument("--scores", default="ram", help="HeadScores JSON, or a registered score "
                   "name (corelens.scores.registry) to score heads first")
    p.add_argument("--data", required=True, help="JSONL, or zoo:N[:SEED] for toy examples")
    p.add_argument("--score-data", default=None,
                   help="examples to score heads on (JSONL or zoo:N:SEED); default: "
                   "zoo:N//2:SEED+1 with zoo data, else a seeded half of --data (the other "
                   "half is evaluated)")
    p.add_argument("--kv-budget", type=float, default=None,
                   help="plan by KV group instead of --frac: keep this fraction of the KV heads "
                   "full, the groups ranked by their best head's score (GQA models)")
    for flag, typ in (("--frac", float), ("--n-sink", int), ("--window", int),
                      ("--n-pooled", int), ("--fastv-k", int), ("--fastv-ratio", float),
                      ("--limit", int), ("--seed", int), ("--batch-size", int)):
        p.add_argument(flag, type=typ, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    main_accelerate(args)
    return 0


def _zoo_spec(data: str) -> tuple[int, int] | None:
    """``zoo:N[:SEED]`` -> (N, SEED); None for anything else (a JSONL path)."""
    if not data.startswith("zoo:"):
        return None
    parts = data.split(":")
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def _data(model_name: str, data: str) -> tuple[list[Any], str]:
    """``zoo:N[:SEED]`` (fresh examples of a shipped model's task) or a corelens JSONL."""
    spec = _zoo_spec(data)
    if spec is None:
        return load_jsonl(data), data
    if model_name not in zoo.names():
        raise InputError("zoo:N data needs --model to be a shipped toy model "
                         f"({', '.join(zoo.names())})")
    n, seed = spec
    return zoo.examples(model_name, n, seed=seed), f"zoo.examples({model_name!r}, {n}, seed={seed})"


def _load(args: Any) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """The model, its head scores, the evaluation examples and where each set came from.

    Heads are never scored on the examples the claims are measured on: with ``zoo:N:SEED``
    data they are scored on ``zoo:max(N // 2, 32):SEED+1`` (disjoint, and held out from the
    training streams like every ``zoo.examples`` set), with ``--score-data`` on that set, and
    with a JSONL alone on a seeded half of it (``split_examples``), the other half evaluated."""
    name = str(args.model)
    model = zoo.load(name) if name in zoo.names() else HookedMLLM.from_pretrained(name)
    examples, source = _data(name, str(args.data))
    score_examples: list[Any] | None = None
    score_source = ""
    if getattr(args, "score_data", None):
        score_examples, score_source = _data(name, str(args.score_data))
    elif (spec := _zoo_spec(str(args.data))) is not None:
        score_examples, score_source = _data(name, f"zoo:{max(spec[0] // 2, 32)}:{spec[1] + 1}")
    to_score = str(args.scores) in registry.names()
    if to_score and score_examples is None:
        score_examples, examples = split_examples(examples)
        score_source = f"split_examples({source}, seed 0): scoring half"
        source = f"split_examples({source}, seed 0): evaluation half"
    limit = getattr(args, "limit", None)
    if limit:
        examples = examples[:limit]
    sets: dict[str, Any] = {"evaluation": {"n": len(examples), "source": source,
                                           "ids": [e.id for e in examples]}}
    if to_score:
        assert score_examples is not None
        check_disjoint(score_examples, examples)
        scores = score_heads(model, score_examples, str(args.scores), progress=False)
        sets["scoring"] = {"n": len(score_examples), "source": score_source,
                           "ids": [e.id for e in score_examples]}
    else:
        scores = HeadScores.load(args.scores)
        sets["scoring"] = {"source": f"HeadScores file {args.scores}"}
    return model, scores, examples, sets


def main_accelerate(args: Any) -> dict[str, Any]:
    """``corelens accelerate --model M --scores S --data D [--score-data D2] [--frac 0.1]
    [--n-sink 4] [--window 64] [--n-pooled 0] [--fastv-k 2] [--fastv-ratio 0.5] [--limit N]
    [--seed 0] [--batch-size 16] [--out report.json]``: teacher-forced accuracy
    (``corelens.evaluate``) and wall time of full attention, the CoRe hybrid, random KV
    heads at the same KV budget (hybrid), and FastV, on the same evaluation examples.

    ``args`` is a namespace: ``model`` (folder / hub id, or a shipped toy model name),
    ``scores`` (a HeadScores JSON, or a metric name of ``corelens.scores.ram`` such as ``"ram"`` or
    ``"selectivity"`` to score heads first, never on the evaluation examples: see ``_load``),
    ``data`` (a corelens JSONL, or ``zoo:N[:SEED]``: N fresh examples of the shipped model's
    task), and optional ``score_data`` (JSONL or ``zoo:N:SEED``), ``frac`` (or ``kv_budget``:
    ``HybridAttention.from_scores``), ``n_sink``, ``window``,
    ``n_pooled``, ``fastv_k``, ``fastv_ratio``, ``limit``, ``seed``, ``batch_size``, ``out``
    (missing or None = the defaults above). Returns (and prints as JSON) the report."""
    def get(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    model, scores, examples, sets = _load(args)
    frac = get("frac", 0.1)
    kw = dict(n_sink=get("n_sink", 4), window=get("window", 64), n_pooled=get("n_pooled", 0))
    budget = get("kv_budget", None)
    core = (HybridAttention.from_scores(model, scores, kv_budget=budget, **kw)
            if budget is not None else HybridAttention(model, scores.top(frac=frac), **kw))
    rand = HybridAttention.random(model, len(core.full_kv_heads), seed=get("seed", 0), **kw)
    fastv = FastV(model, k=get("fastv_k", 2), ratio=get("fastv_ratio", 0.5))
    variants: dict[str, Intervention | None] = {"full": None, "core_hybrid": core,
                                                "random_hybrid": rand, "fastv": fastv}
    report: dict[str, Any] = {
        "model": str(args.model), "metric": scores.metric, **sets, "frac": frac,
        "planned_by": "kv_group" if budget is not None else "head", **kw,
        "kv_budget": core.kv_budget,
        "core_heads": [head_name(h) for h in core.heads],
        "random_kv_heads": [kv_head_name(g) for g in rand.full_kv_heads],
        "fastv": {"k": fastv.k, "ratio": fastv.ratio}, "variants": {}}
    for name, intervention in variants.items():
        t0 = time.perf_counter()
        with intervention.attach() if intervention else contextlib.nullcontext():
            res = evaluate(model, examples, batch_size=get("batch_size", 16), progress=False)
        report["variants"][name] = {"accuracy": res.accuracy, "mean_logprob": res.mean_logprob,
                                    "seconds": round(time.perf_counter() - t0, 3)}
    full = report["variants"]["full"]["accuracy"]
    for v in report["variants"].values():
        v["accuracy_vs_full"] = v["accuracy"] / full if full else float("nan")
    text = json.dumps(report, indent=2)
    out = get("out", None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report
