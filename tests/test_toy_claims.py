"""The research's claims, checked with corelens's own tools on the shipped toy models, against
the reference analysis that uses only plain HF attention outputs and o_proj hooks."""

from __future__ import annotations

import math

import pytest
import torch

from corelens import ablation_curve, zoo
from corelens.scores.ram import score_all
from corelens.zoo import reference

N = 96


@pytest.fixture(scope="module",
                params=["toy-llava", "toy-llava-dense", "toy-llava-deep", "toy-qwen-vl"])
def toy(request):
    name = request.param
    return name, zoo.load(name), zoo.examples(name, N, seed=4242)


@pytest.fixture(scope="module")
def scores(toy):
    _, model, examples = toy
    return score_all(model, examples, batch_size=32, progress=False)


def test_ram_reproduces_the_reference_analysis(toy, scores):
    name, _, examples = toy
    hf, proc = reference.load_plain(zoo.path(name))
    ref = reference.attention_masses(hf, reference._batches(hf, proc, examples, 32))
    assert torch.allclose(scores["ram"].scores, ref["target"], atol=1e-5)
    assert torch.allclose(scores["distractor_mass"].scores, ref["distractor"], atol=1e-5)
    assert torch.allclose(scores["visual_mass"].scores, ref["vision"], atol=1e-5)
    sel = scores["selectivity"].scores
    ok = ~torch.isnan(sel)
    assert ok.sum() > 0 and torch.allclose(sel[ok], ref["selectivity"][ok], atol=1e-5)


def test_core_heads_concentrate_ram_and_are_stable(toy, scores):
    _, model, examples = toy
    ram = scores["ram"]
    n_heads = ram.n_layers * ram.n_heads
    top = ram.top(frac=0.05)
    share = float(sum(ram[h] for h in top) / ram.scores.nansum())
    assert share >= 3 * len(top) / n_heads
    a = score_all(model, examples[: N // 2], batch_size=32, progress=False)["ram"]
    b = score_all(model, examples[N // 2:], batch_size=32, progress=False)["ram"]
    assert a.top(frac=0.05) == b.top(frac=0.05) == top
    lo, hi = ram.bootstrap(n=500)
    # the two retrieval heads' intervals sit above every other head's (they overlap each other)
    first, second, *rest = ram.rank()
    assert min(lo[first], lo[second]) > max(hi[h] for h in rest)
    # and they are selective, not heads that look at every object
    assert all(scores["selectivity"][h] > 0.8 for h in top)


def test_ablating_core_heads_hurts_far_more_than_random(toy, scores):
    """Heads chosen on the scoring set (seed 4242), the ablation measured on another (4243)."""
    name, model, _ = toy
    held_out = zoo.examples(name, N, seed=4243)
    curve = ablation_curve(model, held_out, scores["ram"], fracs=(0.05,),
                           seeds=range(8), batch_size=48, progress=False)
    acc = curve.to_dict("accuracy")
    top, none, bottom = acc["top"][0], acc["none"], acc["bottom"][0]
    random_drops = torch.tensor([none - r for r in acc["random_seeds"][0]])
    gap = (none - top) - random_drops  # per seed: how much more the top-5% ablation hurts
    mean = float(gap.mean())
    half = 2.365 * float(gap.std(unbiased=True)) / math.sqrt(len(gap))  # t(7), 95%
    assert mean >= 0.20 and mean - half > 0, (acc, mean, half)
    assert abs(none - bottom) < 0.02
