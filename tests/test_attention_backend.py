"""The owned attention forward: SDPA by default, eager under pattern hooks, per-head masks, taps."""

from __future__ import annotations

import torch
from conftest import flat_image, noise_image

NAME = "llava"


def _batch(model, images=None):
    imgs = images or [noise_image(80, 50, 0), noise_image(40, 70, 1)]
    return model.prepare(imgs, ["what is the color ?", "what color is the square at left ?"],
                         answers=["red", "blue green"])


def test_eager_only_while_pattern_hooked(tiny_model):
    model = tiny_model(NAME)
    batch = _batch(model)
    seen = []
    attn = model.attention.layers[0]
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        if a[0].shape[1] == model.cfg.n_heads:  # decoder calls (the tower has 2 heads, not 4)
            seen.append("sdpa")
        return orig(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(batch)
            n_plain = len(seen)
            model.run_with_hooks(batch, fwd_hooks=[(attn.hook_pattern.name, lambda p, hook: p)])
            n_hooked = len(seen) - n_plain
            model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_z"))
            n_z = len(seen) - n_plain - n_hooked
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    L = model.cfg.n_layers
    assert n_plain == L  # every decoder layer ran SDPA
    assert n_hooked == L - 1  # the hooked layer went eager
    assert n_z == L  # caching hook_z keeps SDPA


def test_tap_rows_equal_eager_pattern_rows(tiny_model):
    model = tiny_model(NAME)
    batch = _batch(model)
    rows = torch.stack([q[-1:] for q in batch.query_positions]).to(model.device)
    got = {}

    def tap(inputs):
        got[inputs.layer] = inputs.pattern_rows(rows)

    with torch.no_grad(), model.attention.tap(0, tap), model.attention.tap(1, tap):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in (0, 1):
        full = cache[f"blocks.{layer}.attn.hook_pattern"]
        idx = rows[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1])
        expected = torch.gather(full, 2, idx)
        assert torch.allclose(got[layer], expected, atol=1e-6)


def test_key_mask_hides_the_image_from_text(tiny_model):
    """With every head barred from every vision token, text logits ignore the image."""
    model = tiny_model(NAME)
    real = _batch(model)
    blank = _batch(model, [flat_image(80, 50), flat_image(40, 70)])
    assert torch.equal(real.layout.vision_mask(), blank.layout.vision_mask())
    allowed = ~real.layout.vision_mask()[:, None, None, :].to(model.device)
    q = real.last_prompt_positions
    idx = torch.arange(len(real))
    outs = {}
    with torch.no_grad():
        for mode in ("sdpa", "eager"):
            with model.attention.use(mode), model.attention.key_mask(0, allowed), \
                    model.attention.key_mask(1, allowed):
                outs[mode] = (model(real)[idx, q], model(blank)[idx, q])
        unmasked = model(real)[idx, q]
    for mode, (a, b) in outs.items():
        assert torch.allclose(a, b, atol=1e-5), mode
    assert torch.allclose(outs["sdpa"][0], outs["eager"][0], atol=1e-5)
    assert (unmasked - outs["sdpa"][0]).abs().max() > 1e-3  # the mask did something


def test_key_mask_per_head_matches_score_hook(tiny_model):
    """A key mask on one head equals masking that head's pre-softmax scores by hook."""
    model = tiny_model(NAME)
    batch = _batch(model)
    vision = batch.layout.vision_mask().to(model.device)
    H = model.cfg.n_heads
    allowed = torch.ones(len(batch), H, 1, batch.seq_len, dtype=torch.bool, device=model.device)
    allowed[:, 2] = ~vision[:, None, :]

    def mask_scores(scores, hook):
        scores = scores.clone()
        scores[:, 2] = scores[:, 2].masked_fill(vision[:, None, :], torch.finfo(scores.dtype).min)
        return scores

    with torch.no_grad():
        with model.attention.key_mask(1, allowed):
            a = model(batch)
        b = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_attn_scores", mask_scores)])
    real = batch.attention_mask.bool()
    assert (a - b)[real].abs().max() < 1e-5


def test_position_cache_and_logit_lens(tiny_model):
    model = tiny_model(NAME)
    batch = _batch(model)
    _, full = model.run_with_cache(batch)
    _, part = model.run_with_cache(batch, positions="query")
    for e, q in enumerate(batch.query_positions):
        n = len(q)
        assert torch.allclose(part["blocks.1.hook_resid_post"][e, :n],
                              full["blocks.1.hook_resid_post"][e, q])
        assert torch.allclose(part["blocks.0.attn.hook_pattern"][e, :, :n],
                              full["blocks.0.attn.hook_pattern"][e, :, q])
        assert part.position_mask[e, :n].all() and not part.position_mask[e, n:].any()
    _, vis = model.run_with_cache(batch, positions="vision", names_filter="blocks.0.hook_resid_pre")
    v0 = batch.layout.vision_positions(0)
    assert torch.allclose(vis["blocks.0.hook_resid_pre"][0, : len(v0)],
                          full["blocks.0.hook_resid_pre"][0, v0])
    lens = model.logit_lens(batch, positions="query")
    assert lens.shape[:2] == (model.cfg.n_layers, len(batch))
    # the last layer's lens is the model's own logits
    with torch.no_grad():
        logits = model(batch)
    for e, q in enumerate(batch.query_positions):
        assert torch.allclose(lens[-1, e, : len(q)], logits[e, q], atol=1e-4)
    # vision tokens have a lens too
    lv = model.logit_lens(batch, positions="vision", layers=[0])
    assert lv.shape[2] == max(len(batch.layout.vision_positions(e)) for e in range(len(batch)))


def test_padding_does_not_change_an_example(tiny_model):
    model = tiny_model(NAME)
    img = noise_image(80, 50, 0)
    alone = model.prepare([img], ["what is the color ?"], answers=["red"])
    padded = _batch(model)
    with torch.no_grad():
        a = model(alone)[0, alone.query_positions[0]]
        b = model(padded)[0, padded.query_positions[0]]
    assert torch.allclose(a, b, atol=1e-5)


def test_vision_tower_runs_sdpa_unless_its_pattern_is_hooked(tiny_model):
    model = tiny_model(NAME)
    batch = _batch(model)
    attn = model.bridge.vision_encoder.encoder_layers[0].attn.original_component
    with torch.no_grad():
        plain = model(batch)
    assert attn.config._attn_implementation == "sdpa"
    logits, cache = model.run_with_cache(
        batch, names_filter=lambda n: n.startswith("vision") and n.endswith("hook_pattern"))
    assert attn.config._attn_implementation == "eager"
    pattern = cache["vision_encoder.encoder_layers.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5)
    assert torch.allclose(logits, plain, atol=1e-5)
    # the decoder's eager mode leaves the tower on SDPA (no [heads, T, T] per tower block)
    with model.attention.use("eager"), torch.no_grad():
        eager = model(batch)
    assert attn.config._attn_implementation == "sdpa"
    assert torch.allclose(eager, plain, atol=1e-5)
