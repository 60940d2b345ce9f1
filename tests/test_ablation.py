"""Ablation: each method against a direct computation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_image, noise_image

from corelens import GroundedExample, LayoutError
from corelens.interventions.ablation import ablate, text_to_image_knockout, token_roles

NAME = "llava"


def _same_layout_batch(model, n=3, seed=0):
    return model.prepare([noise_image(80, 50, seed + i) for i in range(n)],
                         ["what is the color ?"] * n, answers=["red"] * n,
                         boxes=[(0, 0, 40, 25)] * n)


def test_zero_ablation_equals_zeroing_o_proj_input(tiny_model):
    model = tiny_model(NAME)
    batch = _same_layout_batch(model)
    d = model.cfg.d_head
    o_proj = model.attention.layers[1].o.original_component

    def zero_head_2(module, args):
        x = args[0].clone()
        x[..., 2 * d:3 * d] = 0
        return (x,)

    with torch.no_grad():
        handle = o_proj.register_forward_pre_hook(zero_head_2)
        try:
            expected = model(batch)
        finally:
            handle.remove()
        with ablate(model, [(1, 2)]):
            got = model(batch)
        clean = model(batch)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - clean).abs().max() > 1e-4


def test_mean_and_resample_use_the_reference_z(tiny_model):
    model = tiny_model(NAME)
    batch = _same_layout_batch(model)
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]  # [b, pos, head, d]
    seen = {}

    def grab(z_, hook):
        seen["z"] = z_.detach().clone()

    for method, expected in (("mean", z[:, :, 1].mean(0, keepdim=True).expand(3, -1, -1)),
                             ("resample", z[[1, 2, 0], :, 1])):
        with ablate(model, [(0, 1)], method, batch=batch), torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.o.hook_in", grab)])
        got = seen["z"].view(*z.shape)[:, :, 1]
        assert torch.allclose(got, expected, atol=1e-6), method
        assert torch.allclose(seen["z"].view(*z.shape)[:, :, 0], z[:, :, 0], atol=1e-6)


def test_mean_ablation_refuses_layouts_that_do_not_line_up(tiny_model):
    model = tiny_model(NAME)
    batch = _same_layout_batch(model)
    other = model.prepare([noise_image(80, 50, 9)], ["what is the color of the big square ?"],
                          answers=["red"])
    with pytest.raises(LayoutError, match="no counterpart in the reference"):
        with ablate(model, [(0, 1)], "mean", batch=other, reference=batch):
            pass
    roles = token_roles(batch, 0)
    assert roles[int(batch.layout.vision_positions(0)[0])] == ("image", 0, "image", 0, 0)
    assert roles[int(batch.query_positions[0][0])] == ("text", 0)


def test_knockout_removes_vision_attention_of_that_head_only(tiny_model):
    model = tiny_model(NAME)
    batch = _same_layout_batch(model)
    vision = batch.layout.vision_positions(0)
    with ablate(model, [(1, 3)], "knockout", batch=batch):
        _, cache = model.run_with_cache(batch, names_filter="blocks.1.attn.hook_pattern")
        with torch.no_grad():
            sdpa = model(batch)
    pattern = cache["blocks.1.attn.hook_pattern"][0]
    q = batch.query_positions[0]
    assert pattern[3][q][:, vision].abs().max() == 0
    assert pattern[2][q][:, vision].sum() > 0.01
    with torch.no_grad(), model.attention.use("eager"), \
            ablate(model, [(1, 3)], "knockout", batch=batch):
        eager = model(batch)
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_evidence_knockout_blocks_only_the_evidence(tiny_model):
    model = tiny_model(NAME)
    batch = _same_layout_batch(model)
    ev = batch.evidence_positions(0)
    others = [p for p in batch.layout.vision_positions(0).tolist() if p not in set(ev.tolist())]
    with ablate(model, [(0, 0)], "knockout", batch=batch, keys="evidence"):
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.attn.hook_pattern")
    row = cache["blocks.0.attn.hook_pattern"][0, 0, int(batch.query_positions[0][0])]
    assert row[ev].abs().max() == 0 and row[others].sum() > 0


def test_text_to_image_knockout_everywhere_hides_the_image(tiny_model):
    model = tiny_model(NAME)
    real = _same_layout_batch(model, n=2)
    blank = model.prepare([flat_image(80, 50)] * 2, ["what is the color ?"] * 2,
                          answers=["red"] * 2)
    idx, q = torch.arange(2), real.last_prompt_positions
    layers = range(model.cfg.n_layers)
    with torch.no_grad():
        with text_to_image_knockout(model, real, layers):
            a = model(real)[idx, q]
        with text_to_image_knockout(model, blank, layers):
            b = model(blank)[idx, q]
        clean = model(real)[idx, q]
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - clean).abs().max() > 1e-3


def test_ablation_applies_inside_ram_scoring(tiny_model):
    from corelens.scores.ram import RamMetric

    model = tiny_model(NAME)
    ex = GroundedExample([noise_image(80, 50, 0)], "what is the color ?", "red", [(0, 0, 40, 25)])
    batch = model.prepare_examples([ex])
    metric = RamMetric(model)
    with ablate(model, [(0, 2)], "knockout", batch=batch, keys="evidence"), \
            metric.attach(batch), torch.no_grad():
        model(batch)
    ram = metric.example_level()["ram"][0]
    assert ram[0, 2] == 0 and ram[0, 1] > 0


def test_ablation_curve_structure_and_consistency(tiny_model, tmp_path):
    from corelens.interventions.ablation import AblationCurve, ablation_curve
    from corelens.scores.head_scores import HeadScores

    model = tiny_model(NAME)
    examples = [GroundedExample([noise_image(80, 50, i)], "what is the color ?", "red",
                                [(0, 0, 40, 25)], id=str(i)) for i in range(4)]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores = HeadScores(torch.arange(L * H, dtype=torch.float).view(L, H), "ram")
    curve = ablation_curve(model, examples, scores, fracs=(0.125, 0.5), seeds=(0, 1, 2),
                           batch_size=3, progress=False)
    d = curve.to_dict("logprob")
    assert curve.ks == [1, 4]
    assert len(d["random_seeds"][0]) == 3 and len(d["top"]) == 2
    # top-1 head = L1H3 (highest score): equals a direct zero ablation of that head
    from corelens.interventions.patching import answer_logprob

    batch = model.prepare_examples(examples)
    with ablate(model, [(1, 3)]), torch.no_grad():
        direct = float(answer_logprob(model(batch), batch).mean())
    assert d["top"][0] == pytest.approx(direct, abs=1e-4)
    with torch.no_grad():
        assert d["none"] == pytest.approx(float(answer_logprob(model(batch), batch).mean()),
                                          abs=1e-4)
    assert d["random_lo"][1] <= d["random_mean"][1] <= d["random_hi"][1]
    curve.save(tmp_path / "curve.json")
    back = AblationCurve.load(tmp_path / "curve.json")
    assert back.to_dict("accuracy") == curve.to_dict("accuracy")
