"""The battery every family passes: HF parity, image sensitivity, layout geometry, hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, assert_matches_hf, flat_image, hf_reference, noise_image

from corelens.data.layout import box_overlap_fraction
from corelens.zoo.tiny import tiny_image_sizes

PROMPTS = ["what is the color ?", "what color is the square at left of the circle ?"]
ANSWERS = ["red", "blue green"]


def _batch(model, name, blank=False):
    sizes = tiny_image_sizes(name)[:2]
    imgs = [flat_image(w, h) if blank else noise_image(w, h, seed=i)
            for i, (w, h) in enumerate(sizes)]
    return model.prepare(imgs, PROMPTS, answers=ANSWERS)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_parity_with_hf_batched_padded(name, tiny_folder, tiny_model):
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    batch = _batch(model, name)
    assert batch.attention_mask.min() == 0, "the batch must be padded to test padding"
    expected = assert_matches_hf(model, ref, batch)
    with torch.no_grad():
        blank = model(_batch(model, name, blank=True))
    # a dropped image cannot pass: the image moves the logits far beyond the tolerance
    q = torch.stack([torch.tensor(e) for e in range(len(batch))])
    last = batch.last_prompt_positions
    assert (blank[q, last] - expected[q, last]).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_image_token_counts_match_input_ids(name, tiny_model):
    model = tiny_model(name)
    batch = _batch(model, name)
    tid = model.family.image_token_id(model.hf_model.config, model.processor)
    for e, images in enumerate(batch.layout.images):
        slots = (batch.input_ids[e] == tid).nonzero().flatten().cpu()
        filled = torch.cat([img.positions for img in images]).sort().values
        assert torch.equal(slots, filled)
        assert all(len(img.vision_positions) > 0 for img in images)


def _lm_vision_inputs(model, image, prompt="describe the image"):
    batch = model.prepare([image], [prompt])
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    pos = batch.layout.vision_positions(0)
    return batch, cache["blocks.0.hook_resid_pre"][0, pos.to(model.device)]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_painted_region_changes_exactly_its_tokens(name, tiny_model):
    """Paint a block of tokens' worth of pixels; only the tokens whose boxes cover it move."""
    model = tiny_model(name, patch_local=True)
    for w, h in tiny_image_sizes(name):
        base = flat_image(w, h)
        batch, before = _lm_vision_inputs(model, base)
        img = batch.layout.images[0][0]
        boxes = img.boxes
        widths = (boxes[:, 2] - boxes[:, 0])
        visible = widths > 0
        # pick a visible token near the middle of the first view, paint a 2x2-token block
        centre = torch.tensor([w / 2, h / 2])
        mids = (boxes[:, :2] + boxes[:, 2:]) / 2
        dist = (mids - centre).norm(dim=1) + (~visible) * 1e9
        t = int(dist.argmin())
        x0, y0, x1, y1 = boxes[t].tolist()
        tw, th = x1 - x0, y1 - y0
        corners = [round(x0), round(y0), round(min(x1 + tw, w)), round(min(y1 + th, h))]
        region = torch.tensor(corners, dtype=torch.float)
        painted = base.copy()
        painted.paste((250, 20, 20), tuple(int(v) for v in region.tolist()))
        _, after = _lm_vision_inputs(model, painted)
        change = (after - before).norm(dim=-1).cpu()
        change = change / change.max()
        frac = box_overlap_fraction(boxes, region)
        margin = 0.5 * float(widths[visible].median())
        grown = region + torch.tensor([-margin, -margin, margin, margin])
        far = box_overlap_fraction(boxes, grown) == 0
        assert (change[frac >= 0.5] > 0.3).all(), (name, (w, h), change[frac >= 0.5])
        assert (change[far] < 0.05).all(), (name, (w, h), change[far].max())
        assert (frac >= 0.5).sum() >= 1


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hooks_patterns_vision_encoder_and_edits(name, tiny_model):
    model = tiny_model(name)
    batch = _batch(model, name)
    logits, cache = model.run_with_cache(batch)
    T = batch.seq_len
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (len(batch), model.cfg.n_heads, T, T)
        real = batch.attention_mask.bool()
        sums = pattern.sum(-1).permute(0, 2, 1)[real]
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert any(k.startswith("vision_encoder") for k in cache.keys())
    assert any(k.startswith("vision_projector") for k in cache.keys())

    vision = batch.layout.vision_mask().to(model.device)

    def zero_vision(resid, hook):
        return resid * (~vision).unsqueeze(-1)

    with torch.no_grad():
        clean = model(batch)
        edited = model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_resid_pre", zero_vision)])
    last = batch.last_prompt_positions
    idx = torch.arange(len(batch))
    assert (edited[idx, last] - clean[idx, last]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pattern_edit_propagates(name, tiny_model):
    """Editing hook_pattern changes the output (it sits inside the computation)."""
    model = tiny_model(name)
    batch = _batch(model, name)

    def uniform(pattern, hook):
        return torch.where(pattern > 0, 1.0, 0.0) / (pattern > 0).sum(-1, keepdim=True)

    with torch.no_grad():
        clean = model(batch)
        edited = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_pattern", uniform)])
    real = batch.attention_mask.bool()
    assert (edited - clean)[real].abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_multi_image_example_parity_and_layout(name, tiny_folder, tiny_model):
    """One example with two images, one with one: a layout per image, logits equal to HF's."""
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    (w0, h0), (w1, h1) = tiny_image_sizes(name)[:2]
    imgs = [[noise_image(w0, h0, 0), noise_image(w1, h1, 1)], [noise_image(w1, h1, 2)]]
    batch = model.prepare(imgs, ["compare <image> with <image> ?", "what is the color ?"],
                          answers=["red", "blue"], boxes=[{1: (0, 0, w1 // 2, h1 // 2)}, None])
    assert [len(ex) for ex in batch.layout.images] == [2, 1]
    first, second = batch.layout.images[0]
    assert first.size == (w0, h0) and second.size == (w1, h1)
    assert first.positions.max() < second.positions.min()  # in prompt order
    evidence = batch.evidence_positions(0)
    assert set(evidence.tolist()) <= set(second.vision_positions.tolist())
    with torch.no_grad():
        expected = ref(**batch.inputs).logits
        got = model(batch)
    real = batch.attention_mask.bool()
    assert (got - expected)[real].abs().max() < 1e-4
