"""RAM: a hand-checked case, the fast path against hook_pattern, aggregation and resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILY_NAMES, grounded_examples

from corelens.scores.head_scores import HeadScores
from corelens.scores.ram import ExampleRegions, RamMetric, RamParams, aggregate, masses, score_all


def test_masses_by_hand():
    # one head, one query row over 6 keys: text 0, vision 1..4, text 5
    rows = torch.tensor([[[0.10, 0.05, 0.40, 0.15, 0.20, 0.10]]])
    reg = ExampleRegions(queries=torch.tensor([5]), evidence=torch.tensor([2]),
                         vision=torch.tensor([1, 2, 3, 4]),
                         distractors=[torch.tensor([3]), torch.tensor([4])], sink=0)
    m = masses(rows, reg)
    assert m["ram"].item() == pytest.approx(0.40)
    assert m["visual_mass"].item() == pytest.approx(0.80)
    assert m["distractor_mass"].item() == pytest.approx((0.15 + 0.20) / 2)
    assert m["sink_mass"].item() == pytest.approx(0.10)
    assert m["retrieval"].item() == 1.0  # top-1 key (2) is in the evidence
    p = torch.tensor([0.05, 0.40, 0.15, 0.20]) / 0.80
    assert m["spatial_entropy"].item() == pytest.approx(float(-(p * p.log()).sum()))
    # value weighting: key 2 writes nothing -> no value-weighted RAM
    w = masses(rows, reg, key_weight=torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]))
    assert w["value_weighted_ram"].item() == pytest.approx(0.0)
    # excluding the sink renormalises the rest
    x = masses(rows, reg, exclude_sink=True)
    assert x["ram"].item() == pytest.approx(0.40 / 0.90)


def test_aggregate_by_hand():
    # two examples, one layer, one head
    per = {"ram": torch.tensor([[[0.4]], [[0.1]]]),
           "visual_mass": torch.tensor([[[0.8]], [[0.2]]]),
           "distractor_mass": torch.tensor([[[0.2]], [[0.3]]])}
    for k in ("sink_mass", "retrieval", "spatial_entropy"):
        per[k] = torch.zeros(2, 1, 1)
    out = aggregate(per, torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0]), RamParams())
    assert out["ram"][(0, 0)] == pytest.approx(0.25)
    assert out["relative_ram"][(0, 0)] == pytest.approx(0.5 / 1.0)
    # lift = sum RAM / sum (VM * |R|/|V|) = 0.5 / (0.8 * 0.25 + 0.2 * 0.5)
    assert out["lift"][(0, 0)] == pytest.approx(0.5 / 0.3)
    assert out["selectivity"][(0, 0)] == pytest.approx(0.5 / (0.5 + 0.5))
    # under the mass floor, no ratio score
    low = aggregate(per, torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0]),
                    RamParams(mass_floor=0.6))
    assert math.isnan(low["relative_ram"][(0, 0)]) and not math.isnan(low["ram"][(0, 0)])




@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_fast_ram_equals_hook_pattern_ram(name, tiny_model):
    model = tiny_model(name)
    batch = model.prepare_examples(grounded_examples(name))
    assert batch.attention_mask.min() == 0  # padded
    metric = RamMetric(model, RamParams(value_weighted=True))
    with metric.attach(batch):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    for e, reg in enumerate(metric.regions):
        for layer in range(model.cfg.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][e][:, reg.queries]
            ref = masses(pattern, reg)
            for k in ("ram", "visual_mass", "distractor_mass", "sink_mass", "spatial_entropy"):
                got = metric.token_level[e][k][layer]
                assert torch.allclose(got, ref[k].cpu(), atol=1e-5), (k, layer)
    # and the fast path did not need the pattern: the same values under plain SDPA
    fast = RamMetric(model)
    with fast.attach(batch), torch.no_grad():
        model(batch)
    for e in range(len(batch)):
        assert torch.allclose(fast.token_level[e]["ram"], metric.token_level[e]["ram"], atol=1e-5)


def test_score_all_resumes_to_the_same_result(tiny_model, tmp_path):
    model = tiny_model("llava")
    examples = grounded_examples("llava", n=5)
    full = score_all(model, examples, batch_size=2, progress=False)
    part = tmp_path / "partial.jsonl"
    score_all(model, examples, batch_size=2, partial=part, progress=False)
    assert len(part.read_text().splitlines()) == 3
    part.write_text(part.read_text().splitlines()[0] + "\n")  # "crashed" after one batch
    resumed = score_all(model, examples, batch_size=2, partial=part, progress=False)
    assert len(part.read_text().splitlines()) == 3  # only the missing batches ran
    for k, hs in full.items():
        assert torch.allclose(hs.scores, resumed[k].scores, equal_nan=True, atol=1e-7), k
    ram = full["ram"]
    assert ram.per_example.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    assert ram.params["tau"] == 0.5 and ram.n_examples == 5
    lo, hi = ram.bootstrap(n=200)
    assert (lo <= ram.scores + 1e-6).all() and (ram.scores <= hi + 1e-6).all()


def test_head_scores_rank_top_save_compare(tmp_path):
    s = torch.tensor([[0.1, 0.9, math.nan], [0.5, 0.2, 0.7]])
    hs = HeadScores(s, "ram", model="m", params={"tau": 0.5}, per_example=s[None])
    assert hs.rank() == [(0, 1), (1, 2), (1, 0), (1, 1), (0, 0)]
    assert hs.top(k=2) == [(0, 1), (1, 2)]
    assert hs.top(frac=0.05) == [(0, 1)]  # ceil(0.05 * 6) = 1
    hs.save(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["top_5pct"] == ["L0H1"]
    back = HeadScores.load(tmp_path / "s.json")
    assert torch.allclose(back.scores, hs.scores, equal_nan=True) and back.params == hs.params
    other = HeadScores(s.flip(1), "ram")
    cmp = hs.compare(hs)
    assert cmp["spearman"] == pytest.approx(1.0) and cmp["top_k_overlap"] == 1.0
    assert hs.compare(other, k=2)["top_k_overlap"] < 1.0
    ax = hs.plot()
    assert ax.get_title().startswith("ram")


def test_generation_token_level_ram_equals_teacher_forced(tiny_model):
    """RAM of each generated token's query == RAM at that position of a full forward."""
    from corelens.core.attention import AttentionInputs

    model = tiny_model("llava")
    ex = grounded_examples("llava", n=1)[0]
    batch = model.prepare([ex.images], [ex.question], boxes=[ex.boxes])
    metric = RamMetric(model)
    n = 3
    metric.generate(batch, max_new_tokens=n)
    gen = metric.token_level[0]["ram"]  # [layer, head, step]
    assert gen.shape[-1] == n
    # rebuild the generated sequence and read rows at the positions that produced each token
    with torch.no_grad():
        ids = batch.input_ids
        for _ in range(n):
            mask = torch.ones_like(ids)
            logits = model.bridge(ids, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                                  pixel_values=batch.inputs["pixel_values"])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    rows_at = torch.arange(batch.seq_len - 1, batch.seq_len - 1 + n)[None]
    reg = metric.regions[0]
    got = {}

    def tap(inputs: AttentionInputs):
        got[inputs.layer] = inputs.pattern_rows(rows_at)[0]

    with torch.no_grad(), model.attention.tap(0, tap), model.attention.tap(1, tap):
        mask = torch.ones_like(ids)
        model.bridge(ids, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                     pixel_values=batch.inputs["pixel_values"])
    for layer in (0, 1):
        ref = masses(got[layer], reg)["ram"]
        assert torch.allclose(gen[layer], ref, atol=1e-5)


def test_high_norm_vision_tokens_are_reported_and_excluded():
    rows = torch.tensor([[[0.10, 0.05, 0.40, 0.15, 0.20, 0.10]]])
    reg = ExampleRegions(queries=torch.tensor([5]), evidence=torch.tensor([2]),
                         vision=torch.tensor([1, 2, 3, 4]), distractors=[], sink=0)
    m = masses(rows, reg, high_norm=torch.tensor([4]))
    assert m["high_norm_mass"].item() == pytest.approx(0.20)
    x = masses(rows, reg, exclude_sink=True, high_norm=torch.tensor([4]))
    assert x["ram"].item() == pytest.approx(0.40 / 0.70)  # without first token and token 4


def test_high_norm_detection_in_a_forward(tiny_model):
    """Blow up one vision token's residual: it is found and its mass reported."""
    model = tiny_model("llava")
    batch = model.prepare_examples(grounded_examples("llava", n=1))
    target = int(batch.layout.vision_positions(0)[5])

    def blow_up(resid, hook):
        resid = resid.clone()
        resid[0, target] *= 100
        return resid

    metric = RamMetric(model)
    with metric.attach(batch), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", blow_up)]), \
            torch.no_grad():
        model(batch)
    hi = metric.token_level[0]["high_norm_mass"]
    assert (hi[0] == 0).all()  # layer 0 input is untouched
    assert (hi[1] > 0).all()


def test_kang_spatial_entropy_by_hand():
    from corelens.scores.ram import kang_spatial_entropy

    # 4x4 grid: one 2x2 blob above the mean -> entropy 0; two separate blobs of 2 -> ln 2
    rows = torch.arange(4).repeat_interleave(4)
    cols = torch.arange(4).repeat(4)
    one = torch.zeros(16)
    one[[0, 1, 4, 5]] = 1.0
    two = torch.zeros(16)
    two[[0, 1, 14, 15]] = 1.0
    diag = torch.zeros(16)
    diag[[0, 5, 15]] = 1.0  # 0 and 5 touch diagonally (8-connected); 15 is apart: sizes 2, 1
    flat = torch.ones(16)  # nothing above the mean: no component, entropy 0
    three = torch.zeros(16)
    three[[0, 1, 2, 3, 10, 12]] = 1.0  # a row of 4, then 10 and 12 apart: sizes 4, 1, 1
    ent = kang_spatial_entropy(torch.stack([one, two, diag, flat, three]), rows, cols, 4, 4)
    p = torch.tensor([2 / 3, 1 / 3])
    p3 = torch.tensor([4 / 6, 1 / 6, 1 / 6])
    assert ent[0].item() == pytest.approx(0.0)
    assert ent[1].item() == pytest.approx(math.log(2))
    assert ent[2].item() == pytest.approx(float(-(p * p.log()).sum()))
    assert ent[3].item() == 0.0
    assert ent[4].item() == pytest.approx(float(-(p3 * p3.log()).sum()))


def test_kang_entropy_is_opt_in_and_asked_for_by_name(tiny_model):
    """Off by default (RAM then costs about a forward); RamParams(kang_entropy=True) or asking
    for the score by name computes it, and the other scores do not change."""
    from conftest import grounded_examples

    from corelens.scores.ram import RamParams, score_all, score_heads

    model = tiny_model("llava")
    examples = grounded_examples("llava", 3)
    plain = score_all(model, examples, progress=False)
    full = score_all(model, examples, params=RamParams(kang_entropy=True), progress=False)
    assert "kang_spatial_entropy" not in plain and "kang_spatial_entropy" in full
    assert full["kang_spatial_entropy"].params["kang_entropy"] is True
    for name, hs in plain.items():
        assert torch.equal(hs.scores.nan_to_num(-1), full[name].scores.nan_to_num(-1)), name
    by_name = score_heads(model, examples, "kang_spatial_entropy", progress=False)
    assert torch.equal(by_name.scores.nan_to_num(-1),
                       full["kang_spatial_entropy"].scores.nan_to_num(-1))
