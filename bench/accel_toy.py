"""Accuracy of hybrid attention (CoRe vs random heads), FastV and its budgets, and what the
hybrid loses where, on the shipped toy models: every toy-model figure of docs/accel.md.

Protocol (held out twice): heads are scored on ``zoo.examples(model, 150, seed=1)`` and every
accuracy is measured on ``zoo.examples(model, 300, seed=0)`` — disjoint sets, and both outside
the training streams' seed range (``zoo.scenes.check_held_out``). Streaming heads see
``n_sink=2, window=8`` (one 8-token image row) and the text, as in docs/accel.md.

Sections (``--sections``, default all):

- ``table``: full attention; the CoRe hybrid with the top-k RAM heads full; random KV heads at
  the same KV budget (seeds 0, 1, 2); FastV K=2, 50%. k from ``--heads``.
- ``metrics``: the hybrid at k = 3, 4 full heads chosen by other head scores (selectivity,
  relative RAM, lift), scored on the same scoring set.
- ``fastv``: FastV at smaller budgets (K, ratio) with its vision-KV fraction
  ``(k + (L - k)(1 - ratio)) / L``.
- ``kv``: bytes of the KV cache each method holds after the prefill of 8 prompts
  (``generate(..., max_new_tokens=1)``: no decode step; ``accel.cache_nbytes``), relative to
  HF's own cache of the same prompts.
- ``restrict``: the 2-head hybrid's restrictions applied one part at a time, as per-head key
  masks (``HybridAttention.allowed`` through ``model.attention.key_mask``): all of them (must
  equal the hybrid), only the answer-predicting rows, only the image rows, only the streaming
  heads of the retrieval layer (the layer of the top RAM head), only those of the other layers,
  and each streaming head of the retrieval layer alone.
- ``pooled``: the 2-head hybrid with ``n_pooled`` 4 / 8 / 16 summaries.

Each result is a JSON line appended to ``--out`` as soon as it is measured; a re-run skips the
rows already there (resume after an interruption). The tables are printed at the end.

    python bench/accel_toy.py --out runs/accel_toy.jsonl
    python bench/accel_toy.py --models toy-llava-deep --sections fastv kv --out runs/a.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from corelens import accel, zoo
from corelens.core.evaluate import evaluate, score_logits
from corelens.scores.head_scores import head_name
from corelens.scores.ram import score_all

MODELS = ("toy-llava-deep", "toy-llava", "toy-llava-dense", "toy-qwen-vl")
SECTIONS = ("table", "metrics", "fastv", "kv", "restrict", "pooled")
N_EVAL, EVAL_SEED, N_SCORE, SCORE_SEED = 300, 0, 150, 1
STREAM = dict(n_sink=2, window=8)
HEADS = {"toy-llava-deep": (2, 3, 4), "toy-llava": (1, 2, 4), "toy-llava-dense": (1, 2, 4),
         "toy-qwen-vl": (1, 2, 4)}  # toy-qwen-vl: GQA, 4 query heads per layer on 2 KV heads
FASTV_BUDGETS = ((2, 0.5), (2, 0.75), (2, 0.9), (1, 0.9), (1, 0.95))


def _done(out: Path) -> dict[str, dict]:
    if not out.exists():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


class Runner:
    """One model's examples and head scores; ``row(key, fn)`` measures or reuses a row."""

    def __init__(self, name: str, out: Path) -> None:
        self.name, self.out = name, out
        self.done = _done(out)  # rows of an earlier, interrupted run
        self.model = zoo.load(name)
        self.examples = zoo.examples(name, N_EVAL, seed=EVAL_SEED)
        score_set = zoo.examples(name, N_SCORE, seed=SCORE_SEED)
        assert not {e.id for e in score_set} & {e.id for e in self.examples}
        self.scores = score_all(self.model, score_set, batch_size=16, progress=False)
        self.ram = self.scores["ram"]

    def row(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = f"{self.name}/{key}"
        if key in self.done:
            return self.done[key]
        r = self.done[key] = {"key": key, "model": self.name, **fn()}
        with self.out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
        return r

    def accuracy(self, ctx: Callable[[], Any] = contextlib.nullcontext) -> float:
        with ctx():
            return evaluate(self.model, self.examples, batch_size=50, progress=False).accuracy

    def masked_accuracy(self, masks_for: Callable[[Any], dict[int, torch.Tensor]]) -> float:
        """Accuracy with per-layer key masks built for each batch."""
        good = 0
        for i in range(0, len(self.examples), 50):
            batch = self.model.prepare_examples(self.examples[i:i + 50])
            with contextlib.ExitStack() as stack, torch.no_grad():
                for layer, m in masks_for(batch).items():
                    stack.enter_context(self.model.attention.key_mask(layer, m))
                good += int(score_logits(self.model(batch), batch)[1].sum())
        return good / len(self.examples)


def section_table(r: Runner) -> None:
    r.row("full", lambda: {"accuracy": r.accuracy()})
    for k in HEADS[r.name]:
        core = accel.HybridAttention(r.model, r.ram.top(k=k), **STREAM)
        r.row(f"core/{k}", lambda: {"heads": [head_name(h) for h in core.full_heads],
                                    "kv_budget": core.kv_budget,
                                    "accuracy": r.accuracy(core.attach)})
        for seed in (0, 1, 2):
            rnd = accel.HybridAttention.random(r.model, len(core.full_kv_heads), seed=seed,
                                               **STREAM)
            r.row(f"random/{k}/{seed}", lambda: {
                "heads": [head_name(h) for h in rnd.full_heads], "kv_budget": rnd.kv_budget,
                "accuracy": r.accuracy(rnd.attach)})
    fastv = accel.FastV(r.model, k=2, ratio=0.5)
    r.row("fastv/2/0.5", lambda: {"accuracy": r.accuracy(fastv.attach),
                                  "vision_kv": _vision_kv(r.model, 2, 0.5)})


def section_metrics(r: Runner) -> None:
    for metric in ("ram", "selectivity", "relative_ram", "lift"):
        for k in (3, 4):
            h = accel.HybridAttention(r.model, r.scores[metric].top(k=k), **STREAM)
            r.row(f"metric/{metric}/{k}", lambda: {
                "heads": [head_name(x) for x in h.full_heads], "accuracy": r.accuracy(h.attach)})


def _vision_kv(model: Any, k: int, ratio: float) -> float:
    n = model.cfg.n_layers
    return (k + (n - k) * (1 - ratio)) / n


def section_fastv(r: Runner) -> None:
    for k, ratio in FASTV_BUDGETS:
        fv = accel.FastV(r.model, k=k, ratio=ratio)
        r.row(f"fastv/{k}/{ratio}", lambda: {"accuracy": r.accuracy(fv.attach),
                                             "vision_kv": _vision_kv(r.model, k, ratio)})


def section_kv(r: Runner) -> None:
    ex = r.examples[:8]
    prompts = r.model.prepare([e.images for e in ex], [e.question for e in ex])
    with torch.no_grad():
        out = r.model.hf_model(input_ids=prompts.input_ids, **prompts.model_kwargs(),
                               use_cache=True)
    full = accel.cache_nbytes(out.past_key_values)
    variants: dict[str, Any] = {
        f"hybrid/{k}": accel.HybridAttention(r.model, r.ram.top(k=k), **STREAM)
        for k in HEADS[r.name]}
    variants.update({f"fastv/{k}/{ratio}": accel.FastV(r.model, k=k, ratio=ratio)
                     for k, ratio in FASTV_BUDGETS})

    def measure(method: Any) -> dict[str, Any]:
        method.generate(prompts, max_new_tokens=1)
        b = accel.cache_nbytes(method.last_cache)
        return {"bytes": b, "full_bytes": full, "fraction": b / full,
                "prompt_tokens": int(prompts.input_ids.shape[1]),
                "vision_tokens": int(len(prompts.layout.vision_positions(0)))}

    for key, method in variants.items():
        r.row(f"kv/{key}", lambda: measure(method))


def section_restrict(r: Runner) -> None:
    hybrid = accel.HybridAttention(r.model, r.ram.top(k=2), **STREAM)
    layer = r.ram.top(k=1)[0][0]
    n_layers, n_heads = r.model.cfg.n_layers, r.model.cfg.n_heads

    def masks(rows: str = "all", layers: Any = None, heads: Any = None):
        def build(batch: Any) -> dict[int, torch.Tensor]:
            allowed = hybrid.allowed(batch)
            out = {}
            for lay in range(n_layers) if layers is None else layers:
                m = allowed[lay].clone()
                keep = torch.ones_like(m)  # True = unrestricted
                if rows == "answer":
                    for e, q in enumerate(batch.query_positions):
                        keep[e, :, q] = m[e, :, q]
                elif rows == "image":
                    for e in range(len(batch)):
                        v = batch.layout.vision_positions(e)
                        keep[e, :, v] = m[e, :, v]
                else:
                    keep = m
                if heads is not None:
                    only = torch.zeros(n_heads, dtype=torch.bool)
                    only[list(heads)] = True
                    keep[:, ~only] = True
                out[lay] = keep
            return out
        return build

    others = [x for x in range(n_layers) if x != layer]
    r.row("restrict/hybrid", lambda: {"heads": [head_name(h) for h in hybrid.full_heads],
                                      "accuracy": r.accuracy(hybrid.attach)})
    r.row("restrict/all_masks", lambda: {"accuracy": r.masked_accuracy(masks())})
    r.row("restrict/answer_rows", lambda: {"accuracy": r.masked_accuracy(masks("answer"))})
    r.row("restrict/image_rows", lambda: {"accuracy": r.masked_accuracy(masks("image"))})
    r.row("restrict/retrieval_layer", lambda: {
        "layer": layer, "accuracy": r.masked_accuracy(masks(layers=[layer]))})
    r.row("restrict/other_layers", lambda: {
        "layers": others, "accuracy": r.masked_accuracy(masks(layers=others))})
    for h in range(n_heads):
        if (layer, h) in hybrid.full_heads:
            continue
        r.row(f"restrict/head/L{layer}H{h}", lambda: {
            "accuracy": r.masked_accuracy(masks(layers=[layer], heads=[h]))})


def section_pooled(r: Runner) -> None:
    for p in (4, 8, 16):
        h = accel.HybridAttention(r.model, r.ram.top(k=2), n_pooled=p, **STREAM)
        r.row(f"pooled/{p}", lambda: {"accuracy": r.accuracy(h.attach)})


RUN = {"table": section_table, "metrics": section_metrics, "fastv": section_fastv,
       "kv": section_kv, "restrict": section_restrict, "pooled": section_pooled}


SECTION_TITLES = (("metric/", "full heads by score"), ("fastv/", "FastV (K, ratio)"),
                  ("kv/", "KV cache bytes / HF's"),
                  ("restrict/", "2-head hybrid, restrictions one part at a time"),
                  ("pooled/", "2 heads + n_pooled"))


def tables(rows: dict[str, dict]) -> str:
    """Markdown of what ``rows`` holds."""
    lines = []
    for name in MODELS:
        got = {k.split("/", 1)[1]: v for k, v in rows.items() if v["model"] == name}
        if not got:
            continue
        lines += [f"## {name}", ""]
        if "full" in got:
            lines += ["| full heads (KV budget) | full | CoRe hybrid (RAM) | random, seeds 0/1/2 "
                      "| FastV K=2, 50% |", "|---|---|---|---|---|"]
            for k in HEADS[name]:
                c = got.get(f"core/{k}")
                if not c:
                    continue
                rnd = " / ".join(f"{got[f'random/{k}/{s}']['accuracy']:.3f}" for s in (0, 1, 2)
                                 if f"random/{k}/{s}" in got)
                fv = got.get("fastv/2/0.5", {}).get("accuracy", float("nan"))
                lines.append(f"| {k}: {' '.join(c['heads'])} ({c['kv_budget']:.4f}) | "
                             f"{got['full']['accuracy']:.3f} | {c['accuracy']:.3f} | {rnd} | "
                             f"{fv:.3f} |")
            lines.append("")
        for prefix, title in SECTION_TITLES:
            part = {k: v for k, v in got.items() if k.startswith(prefix)}
            if prefix == "fastv/":
                part = {k: v for k, v in part.items() if "vision_kv" in v}
            if not part:
                continue
            lines += [f"{title}:", "", "| row | value |", "|---|---|"]
            for k, v in part.items():
                if "fraction" in v:
                    val = f"{v['fraction']:.3f} ({v['bytes']:,} of {v['full_bytes']:,} bytes)"
                else:
                    val = f"{v['accuracy']:.3f}"
                    if "vision_kv" in v:
                        val += f" (vision KV {v['vision_kv']:.3f})"
                    if "heads" in v:
                        val += f" ({' '.join(v['heads'])})"
                lines.append(f"| {k[len(prefix):]} | {val} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--out", default="runs/accel_toy.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        r = Runner(name, out)
        for section in args.sections:
            RUN[section](r)
    print(tables(_done(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
