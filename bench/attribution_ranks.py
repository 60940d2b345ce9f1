"""Why the refined attribution estimators looked worse than plain AtP (issue #21, item 7).

On the three shipped toy models, 24 recoloured pairs each (``report.toy_pairs``, seed 7; the
clean answer scored on both sides, ``ContrastPair.logit_diff``), every head's exact patching
effect (``patch_heads`` - baseline) against four estimates: plain AtP, AtP* (QK fix +
GradDrop: a non-negative magnitude), AtP* without GradDrop (signed) and AtP-IG (8 steps).
Printed per estimate: Spearman against the signed exact effects, against |exact| (the right
reference for a magnitude), over the heads whose |exact| is at least 1% of the largest (the
tail of near-zero heads left out), the share of the exact top 3 in the estimate's top 3, and
the least-squares scale of the estimate on the exact effects (1 = right size).

    python bench/attribution_ranks.py [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

MODELS = ("toy-llava", "toy-llava-deep", "toy-qwen-vl")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return r
    ra, rb = rank(a.flatten().double()), rank(b.flatten().double())
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def compare(name: str, n_pairs: int = 24, seed: int = 7) -> dict:
    from corelens import zoo
    from corelens.interventions.attribution import atp_star, attribute_heads
    from corelens.interventions.patching import patch_heads, prepare_pair
    from corelens.report import toy_pairs

    model = zoo.load(name)
    pairs = toy_pairs(zoo.examples(name, n_pairs, seed=seed), zoo.task(name))
    pair = prepare_pair(model, [c for c, _ in pairs], [x for _, x in pairs])
    src, tgt, metric = pair.clean, pair.corrupted, pair.logit_diff
    with torch.no_grad():
        base = float(metric(model(tgt), tgt).mean())
    exact = (patch_heads(model, src, tgt, metric) - base).flatten()
    estimates = {
        "atp": attribute_heads(model, src, tgt, metric),
        "atp* (QK fix + GradDrop)": atp_star(model, src, tgt, metric),
        "atp* without GradDrop": atp_star(model, src, tgt, metric, grad_drop=False),
        "atp-ig (8 steps)": attribute_heads(model, src, tgt, metric, ig_steps=8),
    }
    kept = exact.abs() >= 0.01 * exact.abs().max()
    top = set(exact.abs().topk(3).indices.tolist())
    rows = {}
    for label, est in estimates.items():
        est = est.flatten()
        rows[label] = {
            "spearman_signed": round(spearman(est, exact), 3),
            "spearman_abs": round(spearman(est.abs(), exact.abs()), 3),
            "spearman_signed_without_tail": round(spearman(est[kept], exact[kept]), 3),
            "top3_recall": round(len(top & set(est.abs().topk(3).indices.tolist())) / 3, 2),
            "scale": round(float((est * exact).sum() / (exact * exact).sum()), 3)}
    return {"model": name, "heads": exact.numel(), "heads_without_tail": int(kept.sum()),
            "estimates": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = [compare(name) for name in MODELS]
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for r in out:
        print(f"{r['model']}: {r['heads']} heads, {r['heads_without_tail']} with |exact| >= 1% "
              "of the largest")
        for label, s in r["estimates"].items():
            print(f"  {label:26s} " + "  ".join(f"{k} {v}" for k, v in s.items()))


if __name__ == "__main__":
    main()
