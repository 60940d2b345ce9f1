"""The extension points of the redesign: the head-score registry (one decorated function adds a
score everywhere) and the ``Intervention`` interface that RamMetric, hybrid attention and FastV
share."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import noise_image

from corelens import GroundedExample
from corelens.accel import FastV, HybridAttention
from corelens.cli import parser
from corelens.core.intervention import Intervention
from corelens.scores import registry
from corelens.scores.ram import RamMetric, score_all
from corelens.zoo.tiny import tiny_image_sizes


def _examples(n: int = 3) -> list[GroundedExample]:
    sizes = tiny_image_sizes("llava")
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(GroundedExample(
            images=[noise_image(w, h, i)], question="what is the color ?" + " ?" * i,
            answer="red", boxes=[(0, 0, w // 2, h // 2)],
            distractors=[(w // 2, h // 2, w, h)] if i else [], id=f"e{i}"))
    return out


@pytest.fixture
def text_mass():
    """A score registered the way a user adds one: the mass on every non-vision key."""

    @registry.mean_score("text_mass")
    def _text_mass(x: registry.ScoreInputs) -> torch.Tensor:
        vision = torch.zeros(x.rows.shape[-1], dtype=torch.bool)
        vision[x.regions.vision] = True
        return x.rows[..., ~vision].sum(-1)

    yield "text_mass"
    del registry.SCORES["text_mass"]


def test_a_registered_score_reaches_score_all_and_the_cli(tiny_model, text_mass):
    model = tiny_model("llava")
    scores = score_all(model, _examples(), batch_size=2, progress=False)
    assert text_mass in scores and scores[text_mass].metric == text_mass
    # rows sum to 1: text mass + visual mass = 1 for every example and head
    total = scores[text_mass].per_example + scores["visual_mass"].per_example
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
    choices = next(a.choices for a in parser()._subparsers._group_actions[0]
                   .choices["score"]._actions if a.dest == "metric")
    assert text_mass in choices and set(registry.names()) | {"all"} == set(choices)


def test_registry_kinds_and_ratio_aggregation(tiny_model):
    """Ratio scores are ratios of sums over examples of the mean scores they need; selectivity
    only counts examples that have distractors (example 0 has none)."""
    assert set(registry.names("mean")) >= {"ram", "visual_mass", "distractor_mass"}
    assert set(registry.names("ratio")) == {"relative_ram", "lift", "selectivity"}
    model = tiny_model("llava")
    s = score_all(model, _examples(), batch_size=2, progress=False)
    ram, vm = s["ram"].per_example, s["visual_mass"].per_example
    dm = s["distractor_mass"].per_example
    assert torch.isnan(dm[0]).all() and not torch.isnan(dm[1:]).any()
    ok = vm.mean(0) >= 0.02
    want = torch.where(ok, ram.sum(0) / vm.sum(0), math.nan)
    torch.testing.assert_close(s["relative_ram"].scores, want, equal_nan=True)
    want = torch.where(ok, ram[1:].sum(0) / (ram[1:].sum(0) + dm[1:].sum(0)), math.nan)
    torch.testing.assert_close(s["selectivity"].scores, want, equal_nan=True)


def test_unknown_score_names_the_registry(tiny_model):
    from corelens.scores.ram import score_heads

    with pytest.raises(ValueError, match="registered: ram"):
        score_heads(tiny_model("llava"), _examples(1), "ramm", progress=False)


def test_readers_and_editors_share_the_intervention_interface(tiny_model):
    model = tiny_model("llava")
    for obj in (RamMetric(model), HybridAttention(model, [(0, 0)]), FastV(model, k=1)):
        assert isinstance(obj, Intervention), type(obj).__name__
    assert not isinstance(object(), Intervention)
    batch = model.prepare_examples(_examples(2))
    with torch.no_grad():
        full = model(batch)
        for obj in (HybridAttention(model, [(0, 0)], window=1, n_sink=1), FastV(model, k=1)):
            with obj.attach(batch):
                changed = model(batch)
            assert not torch.allclose(changed, full)  # each really edits the forward
            torch.testing.assert_close(model(batch), full)  # and is gone after the block
