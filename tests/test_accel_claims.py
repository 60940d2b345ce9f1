"""Issue 7's accuracy claim on the shipped deep toy model, with RAM scored on separate held-out
examples: the CoRe hybrid with <= 10% of the heads kept full keeps >= 97% of full accuracy, and
beats random heads at the same KV budget and FastV at a larger one.

toy-llava-deep (8 layers x 4 heads) retrieves in layers 4-7 (docs/zoo.md). What the claim
does NOT get here, reported in docs/accel.md: at 2 full heads (6.25%) the hybrid keeps 0.86,
and FastV at its default (K=2, 50% dropped; 62.5% of the vision KV) keeps 0.98 > 0.97."""

from __future__ import annotations

import types

import pytest

from corelens import zoo
from corelens.accel import FastV, HybridAttention, cache_nbytes
from corelens.cli.accelerate import main_accelerate
from corelens.core.evaluate import evaluate
from corelens.scores.ram import score_heads

pytestmark = pytest.mark.slow

NAME = "toy-llava-deep"
N_TEST = 200  # zoo:200 = seed 0; RAM on 64 other held-out examples (seed 1: disjoint)


@pytest.fixture(scope="module")
def ram_json(tmp_path_factory):
    model = zoo.load(NAME)
    scores = score_heads(model, zoo.examples(NAME, 64, seed=1), "ram", batch_size=32,
                         progress=False)
    path = tmp_path_factory.mktemp("accel-claims") / "ram.json"
    scores.save(path)
    return str(path)


def _random_accuracies(n_full: int, seeds: tuple[int, ...]) -> list[float]:
    model = zoo.load(NAME)
    examples = zoo.examples(NAME, N_TEST, seed=0)
    out = []
    for seed in seeds:
        with HybridAttention.random(model, n_full, seed=seed, n_sink=2, window=8).attach():
            out.append(evaluate(model, examples, batch_size=50, progress=False).accuracy)
    return out


def _report(ram_json: str, frac: float, fastv_ratio: float) -> dict:
    args = types.SimpleNamespace(model=NAME, scores=ram_json, data=f"zoo:{N_TEST}", frac=frac,
                                 window=8, n_sink=2, seed=0, batch_size=50, fastv_k=2,
                                 fastv_ratio=fastv_ratio)
    return main_accelerate(args)


def test_core_hybrid_at_under_10_percent_heads_keeps_97_percent(ram_json):
    # 3 of 32 heads (9.4%) full; FastV keeps 2 full layers + 10% of the vision tokens after:
    # (2 + 6 * 0.1) / 8 = 32.5% of the vision KV; in cache bytes 1.7x the hybrid's (below)
    report = _report(ram_json, frac=0.09, fastv_ratio=0.9)
    acc = {k: v["accuracy"] for k, v in report["variants"].items()}
    assert len(report["core_heads"]) == 3 and report["kv_budget"] <= 0.10
    assert all(int(h[1:].split("H")[0]) >= 4 for h in report["core_heads"]), report
    assert acc["full"] >= 0.97
    assert acc["core_hybrid"] >= 0.97 * acc["full"], acc
    assert acc["core_hybrid"] > acc["fastv"], acc
    rand = [acc["random_hybrid"], *_random_accuracies(3, (1, 2))]
    assert max(rand) < acc["core_hybrid"] - 0.3, (acc, rand)
    # ... and FastV holds the larger KV cache: bytes actually held after the same prefill
    model = zoo.load(NAME)
    ex = zoo.examples(NAME, 8, seed=0)
    prompts = model.prepare([e.images for e in ex], [e.question for e in ex])
    heads = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in report["core_heads"]]
    hybrid = HybridAttention(model, heads, n_sink=2, window=8)
    fastv = FastV(model, k=2, ratio=0.9)
    hybrid.generate(prompts, max_new_tokens=1)
    fastv.generate(prompts, max_new_tokens=1)
    assert cache_nbytes(fastv.last_cache) > 1.5 * cache_nbytes(hybrid.last_cache)


def test_core_hybrid_at_2_heads_still_far_above_random(ram_json):
    # 2 of 32 heads (6.25%): below the 97% bar (0.86 on 300 examples), but far above random
    report = _report(ram_json, frac=0.05, fastv_ratio=0.5)
    acc = {k: v["accuracy"] for k, v in report["variants"].items()}
    assert len(report["core_heads"]) == 2
    rand = [acc["random_hybrid"], *_random_accuracies(2, (1, 2))]
    assert max(rand) < acc["core_hybrid"] - 0.3, (acc, rand)
