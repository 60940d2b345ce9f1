"""Generation runs through the owned attention with a KV cache and agrees with no-cache argmax."""

from __future__ import annotations

import torch
from conftest import noise_image


def test_greedy_generate_matches_uncached_argmax(tiny_model):
    model = tiny_model("llava")
    batch = model.prepare([noise_image(80, 50, 0)], ["what is the color ?"])
    n = 4
    text = model.generate(batch, max_new_tokens=n, skip_special_tokens=False)[0]
    ids = batch.input_ids
    kwargs = {k: v for k, v in batch.model_kwargs().items()}
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones_like(ids)
            pos = (mask.cumsum(-1) - 1)
            logits = model.bridge(ids, attention_mask=mask, position_ids=pos,
                                  pixel_values=kwargs["pixel_values"])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = model.tokenizer.decode(ids[0, batch.seq_len:], skip_special_tokens=False)
    assert text.split() == expected.split()


def test_hooks_fire_during_generation(tiny_model):
    model = tiny_model("llava")
    batch = model.prepare([noise_image(80, 50, 0)], ["what is the color ?"])
    seen = []
    def record(q, hook):
        seen.append(q.shape)

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_rot_q", record)]):
        model.generate(batch, max_new_tokens=3)
    assert len(seen) == 3
    assert seen[0][1] == batch.seq_len and seen[1][1] == 1  # prefill, then one cached step
