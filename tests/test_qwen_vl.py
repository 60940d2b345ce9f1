"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL specifics: M-RoPE ids and rotation, geometry, DeepStack."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import hf_reference, noise_image

from corelens.families import FAMILIES
from corelens.zoo.tiny import tiny_image_sizes

QWEN = [n for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") if n in FAMILIES]
PROMPTS = ["what is the color ?", "what color is the square at left of the circle ?"]


def _batch(model, name):
    sizes = tiny_image_sizes(name)[:2]
    imgs = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return model.prepare(imgs, PROMPTS)


@pytest.mark.parametrize("name", QWEN)
def test_position_ids_equal_hf_own(name, tiny_folder, tiny_model):
    """The ids corelens passes are the ones HF computes itself, and give the same logits."""
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    batch = _batch(model, name)
    assert batch.attention_mask.min() == 0
    seen = []
    handle = ref.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda mod, args: seen.append(args[1].clone()))
    inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    try:
        with torch.no_grad():
            own = ref(**inputs).logits
            explicit = ref(**batch.inputs).logits
    finally:
        handle.remove()
    pos = batch.inputs["position_ids"]
    assert pos.shape == (3, len(batch), batch.seq_len)
    assert torch.equal(seen[0], pos) and torch.equal(seen[1], pos)
    assert torch.equal(own, explicit)
    # M-RoPE is live: height and width rows differ on the vision tokens, agree on text
    vision = batch.layout.vision_mask()
    assert (pos[1][vision] != pos[2][vision]).any()
    real = batch.attention_mask.bool() & ~vision
    assert torch.equal(pos[0][real], pos[1][real]) and torch.equal(pos[1][real], pos[2][real])


@pytest.mark.parametrize("name", QWEN)
def test_rot_q_sees_mrope_rotated_queries(name, tiny_folder, tiny_model):
    """``hook_rot_q`` = HF's own q_proj (+ q_norm) + M-RoPE, recomputed from the HF modules."""
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    batch = _batch(model, name)
    names = ["blocks.0.attn.hook_in", "blocks.0.attn.hook_rot_q"]
    with torch.no_grad():
        clean, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
        attn = ref.model.language_model.layers[0].self_attn
        x = cache["blocks.0.attn.hook_in"]
        q = attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # HF rotates [batch, head, pos, d]
        rope = importlib.import_module(model.family.modeling).apply_rotary_pos_emb
        pos = batch.inputs["position_ids"]
        cos, sin = ref.model.language_model.rotary_emb(x, pos)
        expected = rope(q, q, cos, sin)[0].transpose(1, 2)  # hooks: [batch, pos, head, d]
        text_cos, text_sin = ref.model.language_model.rotary_emb(x, pos[:1].expand(3, -1, -1))
        one_d = rope(q, q, text_cos, text_sin)[0].transpose(1, 2)
    got = cache["blocks.0.attn.hook_rot_q"]
    assert got.shape == expected.shape
    real = batch.attention_mask.bool()
    vision = batch.layout.vision_mask()
    assert (got - expected)[real].abs().max() < 1e-5
    # 1-D RoPE would give other queries on the vision tokens (and the same ones on text)
    assert (got - one_d)[vision].abs().max() > 1e-3
    assert (got - one_d)[real & ~vision].abs().max() < 1e-5

    def scramble(q, hook):  # give every position the last position's rotated query
        return q[:, -1:].expand_as(q).clone()

    with torch.no_grad():
        edited = model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.hook_rot_q", scramble)])
    assert (edited - clean)[real].abs().max() > 1e-3


@pytest.mark.parametrize("name", QWEN)
def test_feature_rows_follow_the_processor(name, tiny_model):
    """Grids match image_grid_thw for many sizes; boxes tile the original image exactly."""
    model = tiny_model(name)
    fam, cfg, proc = model.family, model.hf_model.config, model.processor
    sizes = [(w, h) for w in (17, 33, 48, 64, 100, 150) for h in (20, 47, 80, 129)]
    imgs = [noise_image(w, h, seed=0) for w, h in sizes]
    enc = proc.image_processor(images=imgs, return_tensors="pt")
    merge = proc.image_processor.merge_size
    counts = set()
    for i, (w, h) in enumerate(sizes):
        rows = fam.feature_rows(cfg, proc, enc, i, (w, h))
        view = rows.views[0]
        _, gh, gw = enc["image_grid_thw"][i].tolist()
        assert (view.rows, view.cols) == (gh // merge, gw // merge)
        assert len(rows) == gh * gw // merge**2
        b = view.boxes.double()
        assert b[0, 0, :2].tolist() == [0, 0] and b[-1, -1, 2:].tolist() == [w, h]
        assert torch.allclose(b[:, 1:, 0], b[:, :-1, 2]) and torch.allclose(b[1:, :, 1],
                                                                            b[:-1, :, 3])
        area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).sum()
        assert abs(float(area) - w * h) < 1e-3 * w * h
        counts.add(len(rows))
    assert len(counts) > 3
    bad = dict(enc)
    bad["image_grid_thw"] = enc["image_grid_thw"].clone()
    bad["image_grid_thw"][2, 1] += 2 * merge
    with pytest.raises(ValueError, match="image 2"):
        fam.feature_rows(cfg, proc, bad, 2, sizes[2])


@pytest.mark.parametrize("name", QWEN)
def test_tiny_sizes_cover_the_geometry(name, tiny_model):
    model = tiny_model(name)
    sizes = tiny_image_sizes(name)
    batch = model.prepare([noise_image(w, h, seed=0) for w, h in sizes], ["describe"] * len(sizes))
    grids = [(img.views[0].rows, img.views[0].cols) for ex in batch.layout.images for img in ex]
    assert len({r * c for r, c in grids[:2]}) == 2  # the parity batch pads
    assert len({round(w / h, 2) for w, h in sizes}) == len(sizes)


@pytest.mark.parametrize("name", [n for n in QWEN if n == "qwen3_vl"])
def test_deepstack_hooks(name, tiny_model):
    """The merger hook holds exactly what HF adds between block 0 and block 1, and edits it."""
    model = tiny_model(name)
    levels = model.hf_model.config.vision_config.deepstack_visual_indexes
    assert len(levels) >= 1
    batch = _batch(model, name)
    merger = "vision_encoder.deepstack_mergers.0.hook_out"
    names = {merger, "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"}
    assert names <= set(model.hook_dict)
    with torch.no_grad():
        clean, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    vision = batch.layout.vision_mask().to(clean.device)
    added = cache["blocks.1.hook_resid_pre"] - cache["blocks.0.hook_resid_post"]
    injected = cache[merger]
    assert injected.shape == (int(vision.sum()), model.cfg.d_model)
    assert added[~vision].abs().max() == 0  # text positions: nothing added between blocks
    assert (added[vision] - injected).abs().max() < 1e-5  # vision positions: the merger output
    assert injected.abs().max() > 1e-3

    seen = {}

    def zero(x, hook):
        return torch.zeros_like(x)

    def save(key):
        def hook(x, hook):
            seen[key] = x.clone()
        return hook

    with torch.no_grad():
        edited = model.run_with_hooks(batch, fwd_hooks=[
            (merger, zero), ("blocks.0.hook_resid_post", save("post0")),
            ("blocks.1.hook_resid_pre", save("pre1"))])
    real = batch.attention_mask.bool()
    assert (edited - clean)[real].abs().max() > 1e-3  # the edit reaches the output
    assert torch.equal(seen["pre1"], seen["post0"])  # injection zeroed: resid_pre[1] == post[0]
