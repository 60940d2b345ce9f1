"""A planted two-layer circuit with hand-set weights: one sender -> receiver path carries the
evidence colour to the answer, so every causal method has a known right answer.

Tiny LLaVA (8x8 vision tokens of 8 px, decoder d_model 64, 2 layers, 4 heads of 16, 2 KV heads,
rope_theta = 1e30 so q/k dim 7 is unrotated). Residual dims 5, 6, 8, 9, 10 are the circuit's
("circuit dims"); nothing else reads or writes them.

- Vision (pixels rescaled, not normalised): the patch conv reads (R - G) of each cell (red =
  +, green = -, gray = exactly 0) into tower dims 2/3 = +-c; the position embedding marks the
  four evidence cells (dims 0/1 = +-beta, as in ``test_ram_planted``). The projector
  (gelu(u) - gelu(-u) = u, exactly) writes the evidence marker to dim 5 and the signed colour
  to dim 6, and a fixed noise bias (std NOISE, 0 on the circuit dims) to every vision token.
- Text: embeddings are noise (std NOISE, so the residual is not dominated by the circuit dims)
  and 0 on the circuit dims, except the token "color" (T), which carries dim 10 = TAU.
- L0H2, the sender: constant query (q-bias A_Q e_7), its KV head 1 keys read dim 5 -> it attends
  to the evidence tokens from every later position; its value dim 0 reads dim 6, written by W_O
  to dim 8 (the moved colour). L0H3 shares KV head 1 but its output drops that value dim.
- L1H1, the receiver: constant query, KV head 0 keys read dim 10 -> it attends to T; value dim 0
  reads dim 8, written to dim 9. L1H0 shares KV head 0 and drops that value dim.
- Unembedding: the rows of "red" and "green" are equal except dim 9 (+U / -U): logit(red) -
  logit(green) = 2 U x_9 / rms(x) at the answer position.
- Every other head and both MLPs are random but blind to the circuit dims (zero weights on them
  in and out); the tower/projector keep them out of the vision tokens.

Hence (clean: red square, corrupted: green square, same layout): the whole residual stream of
the two runs is identical up to the sign of dims 6, 8 and 9 (RMSNorm only sees squares), so
logit_diff(corrupted) = -logit_diff(clean) exactly, only L0H2 and L1H1 have a z that differs,
and the only sender -> receiver path that matters is L0H2 -> L1's KV head 0 value input.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

GRID, PATCH = 8, 8
EVIDENCE_CELLS = [(2, 2), (2, 3), (3, 2), (3, 3)]
BOX = (2 * PATCH, 2 * PATCH, 4 * PATCH, 4 * PATCH)  # exactly the four evidence cells
CIRCUIT_DIMS = [5, 6, 8, 9, 10]
SENDER, RECEIVER = (0, 2), (1, 1)
SENDER_KV, RECEIVER_KV = 1, 0
A_Q, W_K, TAU, U, NOISE = 4.0, 1.0, 60.0, 20.0, 3.0
PROMPT, OTHER_PROMPT = "what is the color of the square ?", "what is the shape of the square ?"
RED, GREEN, GRAY = (255, 0, 0), (0, 255, 0), (128, 128, 128)


def scene(color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (GRID * PATCH, GRID * PATCH), GRAY)
    ImageDraw.Draw(img).rectangle([BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1], fill=color)
    return img


def _blind(linear: torch.nn.Linear, rows: slice | None = None) -> None:
    """The linear map (or its output rows ``rows``) reads nothing from the circuit dims."""
    w = linear.weight if rows is None else linear.weight[rows]
    w[:, CIRCUIT_DIMS] = 0.0


def build_planted_circuit(folder) -> None:
    from corelens.zoo.tiny.llava import tiny_llava

    model, proc = tiny_llava(folder, image_size=GRID * PATCH, patch=PATCH, center_crop=False,
                             attention_bias=True, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e30})
    proc.image_processor.do_normalize = False  # pixels x / 255: gray gives R - G = 0 exactly
    d = 16
    with torch.no_grad():
        tower = model.model.vision_tower
        conv = tower.embeddings.patch_embedding
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
        k = 10.0 / (PATCH * PATCH)  # a full red / green cell -> +-10
        for ch, sign in ((2, 1.0), (3, -1.0)):
            conv.weight[ch, 0] = sign * k
            conv.weight[ch, 1] = -sign * k
        pos = torch.zeros_like(tower.embeddings.position_embedding.weight)
        evidence = {1 + r * GRID + c for r, c in EVIDENCE_CELLS}  # row 0 is CLS
        for j in range(pos.shape[0]):
            s = 1.0 if j in evidence else -1.0
            pos[j, 0], pos[j, 1] = s * 10.0, -s * 10.0
        tower.embeddings.position_embedding.weight.copy_(pos)
        tower.embeddings.class_embedding.zero_()
        tower.pre_layrnorm.weight.fill_(1.0)
        tower.pre_layrnorm.bias.zero_()
        proj = model.model.multi_modal_projector
        for lin in (proj.linear_1, proj.linear_2):
            lin.weight.zero_()
            lin.bias.zero_()
        proj.linear_1.weight[0, 0], proj.linear_1.weight[0, 1] = 5.0, -5.0  # marker
        proj.linear_1.weight[1, 2], proj.linear_1.weight[1, 3] = 3.0, -3.0  # colour u
        proj.linear_1.weight[2, 2], proj.linear_1.weight[2, 3] = -3.0, 3.0  # -u
        gen = torch.Generator().manual_seed(0)
        proj.linear_2.bias.copy_(NOISE * torch.randn(proj.linear_2.bias.shape, generator=gen))
        proj.linear_2.bias[CIRCUIT_DIMS] = 0.0  # every vision token: noise off the circuit dims
        proj.linear_2.weight[5, 0] = 1.0
        proj.linear_2.weight[6, 1], proj.linear_2.weight[6, 2] = 1.0, -1.0  # gelu(u)-gelu(-u)

        lm = model.model.language_model
        emb = lm.embed_tokens.weight
        emb.copy_(NOISE * torch.randn(emb.shape, generator=gen))  # residual norms of order 1
        emb[:, CIRCUIT_DIMS] = 0.0
        t_id = proc.tokenizer.convert_tokens_to_ids("color")
        lm.embed_tokens.weight[t_id, 10] = TAU
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _blind(lin)
            attn.o_proj.weight[CIRCUIT_DIMS] = 0.0
            mlp.down_proj.weight[CIRCUIT_DIMS] = 0.0
            if attn.o_proj.bias is not None:
                attn.o_proj.bias[CIRCUIT_DIMS] = 0.0
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                if lin.bias is not None:
                    lin.bias.zero_()

        def plant(layer: int, head: int, kv: int, key_dim: int, value_dim: int,
                  out_dim: int, partner: int) -> None:
            attn = lm.layers[layer].self_attn
            q = slice(head * d, (head + 1) * d)
            attn.q_proj.weight[q] = 0.0
            attn.q_proj.bias[head * d + 7] = A_Q
            attn.k_proj.weight[kv * d + 7] = 0.0
            attn.k_proj.weight[kv * d + 7, key_dim] = W_K
            attn.v_proj.weight[kv * d] = 0.0
            attn.v_proj.weight[kv * d, value_dim] = 1.0
            attn.o_proj.weight[:, q] = 0.0
            attn.o_proj.weight[out_dim, head * d] = 1.0
            attn.o_proj.weight[:, partner * d] = 0.0  # the KV partner drops that value dim

        plant(*SENDER, SENDER_KV, key_dim=5, value_dim=6, out_dim=8, partner=3)
        plant(*RECEIVER, RECEIVER_KV, key_dim=10, value_dim=8, out_dim=9, partner=0)
        head = model.lm_head.weight
        red, green = (proc.tokenizer.convert_tokens_to_ids(w) for w in ("red", "green"))
        head[:, CIRCUIT_DIMS] = 0.0
        head[green] = head[red]
        head[red, 9], head[green, 9] = U, -U
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


def pairs(model, noising_prompt: bool = False):
    """(clean, corrupted) batches: red vs green evidence square (or, with ``noising_prompt``,
    the clean scene asked without the token T that the receiver looks for)."""
    boxes = [[BOX]]
    clean = model.prepare([scene(RED)], [PROMPT], answers=["red"], boxes=boxes)
    if noising_prompt:
        other = model.prepare([scene(RED)], [OTHER_PROMPT], answers=["red"], boxes=boxes)
    else:
        # teacher-forces the clean answer too (patching refuses pairs that force different
        # answers: the target's would be scored); the metric reads red - green at the query
        other = model.prepare([scene(GREEN)], [PROMPT], answers=["red"], boxes=boxes)
    return clean, other


def red_minus_green(model):
    from corelens.interventions.patching import logit_diff

    tok = model.tokenizer
    red, green = (tok.convert_tokens_to_ids(w) for w in ("red", "green"))
    return logit_diff(torch.tensor([red]), torch.tensor([green]))
