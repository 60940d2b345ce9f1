"""A planted retrieval head, wired by hand: RAM ranks it first, with the value a formula gives.

Construction (tiny LLaVA, 8x8 vision tokens, decoder d_model 64, 4 heads of 16, 2 KV heads):

- the vision tower ignores pixels (patch conv = 0): each vision token's feature is its position
  embedding, +-beta (e_0 - e_1), "+" on the four evidence cells, so after the pre-LayerNorm it is
  +-4 (e_0 - e_1);
- the projector maps "+" to exactly A e_5 and "-" to exactly 0 (gelu of +-20);
- text embeddings have 0 in dim 5; so at layer 0 only the evidence tokens carry dim 5, and
  RMSNorm makes it exactly 8;
- planted head L0H2: W_Q = 0 and q-bias a e_7 (the same query everywhere), its KV head's key
  reads dim 5 into dim 7 with weight w: score = a * w * 8 / sqrt(16) = 2aw on evidence keys and
  0 on every other key (rope_theta = 1e30 leaves dim 7 unrotated to float precision);
- L0H3 shares that KV head but has q_7 = 0, so it attends uniformly.

So at query position p (no padding, n_E = 4 evidence keys among p + 1):
    RAM(L0H2) = n_E e^{2aw} / (n_E e^{2aw} + p + 1 - n_E),   RAM(L0H3) = n_E / (p + 1).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from corelens import GroundedExample, HookedMLLM
from corelens.scores.ram import score_all

A_Q, W_K = 1.5, 1.0  # score on evidence keys: 2 * a * w = 3
EVIDENCE_CELLS = [(2, 2), (2, 3), (3, 2), (3, 3)]
GRID, PATCH = 8, 8


def build_planted(folder) -> None:
    from corelens.zoo.tiny.llava import tiny_llava

    model, proc = tiny_llava(folder, image_size=GRID * PATCH, patch=PATCH, center_crop=False,
                             attention_bias=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e30})
    with torch.no_grad():
        tower = model.model.vision_tower
        tower.embeddings.patch_embedding.weight.zero_()
        pos = torch.zeros_like(tower.embeddings.position_embedding.weight)
        beta = 10.0
        evidence = {1 + r * GRID + c for r, c in EVIDENCE_CELLS}  # row 0 is CLS
        for j in range(pos.shape[0]):
            sign = 1.0 if j in evidence else -1.0
            pos[j, 0], pos[j, 1] = sign * beta, -sign * beta
        tower.embeddings.position_embedding.weight.copy_(pos)
        tower.pre_layrnorm.weight.fill_(1.0)
        tower.pre_layrnorm.bias.zero_()
        proj = model.model.multi_modal_projector
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.weight[0, 0], proj.linear_1.weight[0, 1] = 2.5, -2.5  # +-4 -> +-20
        proj.linear_2.weight.zero_()
        proj.linear_2.bias.zero_()
        proj.linear_2.weight[5, 0] = 80.0 / 20.0  # A e_5 with A = 80
        lm = model.model.language_model
        lm.embed_tokens.weight[:, 5] = 0.0
        attn = lm.layers[0].self_attn
        d = 16
        # planted query head 2: constant query a e_7
        attn.q_proj.weight[2 * d:3 * d].zero_()
        attn.q_proj.bias[2 * d:3 * d].zero_()
        attn.q_proj.bias[2 * d + 7] = A_Q
        # head 3 shares KV head 1: no query in dim 7 -> uniform over the keys below
        attn.q_proj.weight[3 * d + 7].zero_()
        attn.q_proj.bias[3 * d + 7] = 0.0
        # KV head 1: key dim 7 reads residual dim 5
        attn.k_proj.weight[1 * d:2 * d].zero_()
        attn.k_proj.bias[1 * d:2 * d].zero_()
        attn.k_proj.weight[1 * d + 7, 5] = W_K
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


def test_planted_head_ranks_first_with_hand_computed_ram(tmp_path):
    build_planted(tmp_path)
    model = HookedMLLM.from_pretrained(tmp_path)
    img = Image.new("RGB", (GRID * PATCH, GRID * PATCH), (90, 140, 200))
    box = (2 * PATCH, 2 * PATCH, 4 * PATCH, 4 * PATCH)  # exactly the four evidence cells
    ex = GroundedExample([img], "what is the color of the square ?", "red blue", [box], id="p")
    batch = model.prepare_examples([ex])
    assert len(batch.evidence_positions(0)) == 4

    scores = score_all(model, [ex], progress=False)
    ram = scores["ram"]
    assert ram.rank()[0] == (0, 2)

    n_e = 4
    s = 2 * A_Q * W_K
    positions = batch.query_positions[0].tolist()
    planted = sum(n_e * math.exp(s) / (n_e * math.exp(s) + p + 1 - n_e) for p in positions)
    uniform = sum(n_e / (p + 1) for p in positions)
    assert abs(ram[(0, 2)] - planted / len(positions)) < 1e-5
    assert abs(ram[(0, 3)] - uniform / len(positions)) < 1e-5
    # its visual mass: evidence plus the (zero-score) other vision tokens, by the same formula
    n_v = GRID * GRID
    vm = sum((n_e * math.exp(s) + n_v - n_e) / (n_e * math.exp(s) + p + 1 - n_e)
             for p in positions) / len(positions)
    assert abs(scores["visual_mass"][(0, 2)] - vm) < 1e-5
    assert scores["retrieval"][(0, 2)] == 1.0
