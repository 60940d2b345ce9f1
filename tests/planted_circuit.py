"""A planted two-layer circuit with hand-set weights: one sender -> receiver path carries the
evidence colour to the answer, so every causal method has a known right answer. One builder for
several families (``VARIANTS``): the decoder is planted by the same code in each, and a small
per-family part sets the vision side so that the LM's vision tokens carry an evidence marker
and the signed colour.

Each variant is the family's tiny model (``corelens.zoo.tiny``) rebuilt from its config with
``rope_theta = 1e30`` (rotary leaves q/k dim 7 alone: its frequency is 1e30^(-7/8), an angle of
~1e-26 per position, so cos = 1 and sin ~ 0 in float32 -- this covers the Qwen-VLs' M-RoPE
too, plain or interleaved: only the axis that index 7 follows differs), attention biases on
(Qwen2's q/k/v biases are always there; Llama's and Qwen3's come with ``attention_bias``) and
untied embeddings; decoder d_model 64, 2 layers, 4 heads of 16, 2 KV heads. Residual dims 5,
6, 8, 9, 10 are the circuit's ("circuit dims"); nothing else reads or writes them.

- Vision: every vision token gets a fixed noise vector (std NOISE, 0 on the circuit dims: the
  projector / merger's last bias); evidence tokens get the marker on dim 5 (~28), every token its
  signed colour (R - G, red +, green -, gray exactly 0) on dim 6, through a projector MLP set so
  that gelu(u) - gelu(-u) = u carries the colour exactly (``_projector``). Pixels are rescaled,
  not normalised. Per family (``_vision_*``):
  - LLaVA (CLIP, learned position embedding): the patch conv reads (R - G) into tower dims 2/3;
    the position embedding marks the evidence patches (dims 0/1 = +-10, -+10 elsewhere); the
    tower's pre-LayerNorm keeps both (signs and norms), the Linear-GELU-Linear projector maps
    them. LLaVA-NeXT (CLIP) and LLaVA-OneVision (SigLIP: no CLS, no pre-LayerNorm, the
    projector reads the raw pairs): the same, encoder layers made identities; anyres turns a
    32-px image into a base view and one tile of the same scale, so the evidence is 4 tokens in
    each view; ``image_newline`` (after each tile row) is noise off the circuit dims.
  - InternVL (InternViT, learned position embedding, pixel shuffle): the same patch / position
    scheme on its 4-px patches; its encoder layers are made identities (attention output and
    MLP fc2 zeroed); the pixel shuffle concatenates 2x2 patches (4 x 32 channels), the
    projector's LayerNorm(128) keeps the signs (every pair is +-, so the mean is 0) and its MLP
    sums the four sub-patches.
  - Idefics3, SmolVLM (SigLIP, learned position embedding, pixel shuffle, image splitting off:
    one 32-px view): the same patch scheme; the projector is one bias-free Linear (no GELU),
    so the position embedding marks evidence patches with +-10 and leaves the rest at 0 (the
    marker is 0 off the evidence, not negative), and a constant +-10 pair in every patch
    carries the noise through the post-LayerNorm.
  - Qwen2-VL, Qwen2.5-VL, Qwen3-VL (no absolute position that survives a uniform image: 2D
    rotary inside the vision attention only, Qwen3-VL's learned position embedding zeroed):
    the marker is the content's "warmth" (R + G)/2 - B (red and green 0.5, gray exactly 0),
    read by the Conv3d patch embed as a +- pair of tower dims, beside +-(R - G) and
    +-(R + G + B) (the merger's LayerNorm / RMSNorm sees mean 0 and the same norm for red and
    green); the vision blocks are identities (attention proj and the MLP's last linear zeroed,
    Qwen2.5-VL's window reordering then does nothing); the merger (norm per patch, 2x2 patches
    concatenated, Linear-GELU-Linear) sums the four sub-patches, and gelu(marker) is exactly 0
    on gray. Qwen3-VL's DeepStack mergers are zeroed (they add exactly 0 after decoder layer 0:
    EAP's graph has no edge for them, and the edge methods warn so).
- Text: embeddings are noise (std NOISE, so the residual is not dominated by the circuit dims)
  and 0 on the circuit dims, except the token "color" (T), which carries dim 10 = TAU.
- L0H2, the sender: constant query (q-bias A_Q e_7), its KV head 1 keys read dim 5 -> it attends
  to the evidence tokens from every later position; its value dim 0 reads dim 6, written by W_O
  to dim 8 (the moved colour). L0H3 shares KV head 1 but its output drops that value dim.
- L1H1, the receiver: constant query, KV head 0 keys read dim 10 -> it attends to T; value dim 0
  reads dim 8, written to dim 9. L1H0 shares KV head 0 and drops that value dim.
  (InternVL's and Qwen3-VL's Qwen3 decoders normalise q and k per head, q_norm / k_norm: the
  query is then 4 e_7 whatever A_Q, and a key's dim 7 is divided by the RMS of its head's 16
  dims, so a score is at most 4 x 4 x gain / 4: k_norm's gain on dim 7 is K_NORM_GAIN = 3
  (scores up to 12, the receiver's attention at T saturates as in the other decoders); keys
  that read no marker stay exactly 0, so the evidence alone still gets the raised score.)
- Unembedding: the rows of "red" and "green" are equal except dim 9 (+U / -U): logit(red) -
  logit(green) = 2 U x_9 / rms(x) at the answer position.
- Every other head and both MLPs are random but blind to the circuit dims (zero weights on them
  in and out); the tower/projector keep them out of the vision tokens.

Hence (clean: red square, corrupted: green square, same layout): the whole residual stream of
the two runs is identical up to the sign of dims 6, 8 and 9 (RMSNorm, LayerNorm over +- pairs
and q/k norms only see squares), so logit_diff(corrupted) = -logit_diff(clean) exactly, only
L0H2 and L1H1 have a z that differs, and the only sender -> receiver path that matters is L0H2
-> L1's KV head 0 value input. A gray evidence square moves no colour: logit_diff 0.

Every family corelens supports is planted but Gemma 3: its sandwich norms normalise each
attention / MLP output before the residual add, so heads do not add up and the edge graph
refuses it (``check_eap_supported``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from corelens.data.examples import GroundedExample
from corelens.heads import head_name
from corelens.interventions.patching import logit_diff
from corelens.zoo.tiny import build_tiny

CIRCUIT_DIMS = [5, 6, 8, 9, 10]
SENDER, RECEIVER = (0, 2), (1, 1)
SENDER_KV, RECEIVER_KV = 1, 0
A_Q, W_K, TAU, U, NOISE = 4.0, 1.0, 60.0, 20.0, 3.0
K_NORM_GAIN = 3.0  # decoders with q_norm / k_norm (InternVL's, Qwen3-VL's)
PROMPT, OTHER_PROMPT = "what is the color of the square ?", "what is the shape of the square ?"
RED, GREEN, GRAY = (255, 0, 0), (0, 255, 0), (128, 128, 128)
# the planted edges (EAP's graph names)
KNOWN = {("embed", f"L0KV{SENDER_KV}.v"), (head_name(SENDER), f"L1KV{RECEIVER_KV}.v"),
         (head_name(RECEIVER), "logits")}


@dataclass(frozen=True)
class Variant:
    """A family's planted model: the image is ``grid`` x ``grid`` LM tokens of ``token_px``
    pixels (one tile / one view, no resizing), the evidence a 2 x 2 block of them; ``vision``
    hand-sets the tower and projector (``(hf_model, generator)``)."""

    family: str
    grid: int
    token_px: int
    vision: Callable[[Any, torch.Generator], None]

    @property
    def evidence_cells(self) -> list[tuple[int, int]]:
        e = self.grid // 4
        return [(e, e), (e, e + 1), (e + 1, e), (e + 1, e + 1)]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Exactly the four evidence cells, in pixels."""
        lo, hi = self.grid // 4 * self.token_px, (self.grid // 4 + 2) * self.token_px
        return (lo, lo, hi, hi)

    def scene(self, color: tuple[int, int, int]) -> Image.Image:
        side = self.grid * self.token_px
        img = Image.new("RGB", (side, side), GRAY)
        b = self.box
        ImageDraw.Draw(img).rectangle([b[0], b[1], b[2] - 1, b[3] - 1], fill=color)
        return img


# --- the per-family vision side ------------------------------------------------------------------
def _projector(lin1: torch.nn.Linear, lin2: torch.nn.Linear, marker: dict[int, float],
               colour: dict[int, float], gen: torch.Generator) -> None:
    """``lin2(gelu(lin1(x)))``: dim 5 = gelu(marker . x), dim 6 = colour . x exactly
    (gelu(u) - gelu(-u) = u), a fixed noise bias (0 on the circuit dims) everywhere else."""
    for lin in (lin1, lin2):
        lin.weight.zero_()
        lin.bias.zero_()
    for i, w in marker.items():
        lin1.weight[0, i] = w
    for i, w in colour.items():
        lin1.weight[1, i], lin1.weight[2, i] = w, -w
    lin2.bias.copy_(NOISE * torch.randn(lin2.bias.shape, generator=gen))
    lin2.bias[CIRCUIT_DIMS] = 0.0  # every vision token: noise off the circuit dims
    lin2.weight[5, 0] = 1.0
    lin2.weight[6, 1], lin2.weight[6, 2] = 1.0, -1.0


def _red_minus_green_conv(conv: Any, patch_pixels: int) -> None:
    """A patch conv (bias zeroed) reading +-(R - G) of the patch into tower dims 2 / 3: a full
    red / green patch gives +-10."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    k = 10.0 / patch_pixels
    for ch, sign in ((2, 1.0), (3, -1.0)):
        conv.weight[ch, 0] = sign * k
        conv.weight[ch, 1] = -sign * k


def _position_marker(pos: torch.Tensor, patches: int, per_token: int,
                     cells: list[tuple[int, int]], cls_row: bool = True) -> None:
    """Position embedding rows (row 0 is CLS where ``cls_row``) of a ``patches`` x ``patches``
    grid: dims 0 / 1 = +-10 on the patches of the evidence LM tokens (``per_token`` patches a
    side), -+10 elsewhere."""
    pos.zero_()
    for r in range(patches):
        for c in range(patches):
            s = 1.0 if (r // per_token, c // per_token) in cells else -1.0
            j = int(cls_row) + r * patches + c
            pos[j, 0], pos[j, 1] = 10.0 * s, -10.0 * s


def _vision_llava(model: Any, gen: torch.Generator) -> None:
    """LLaVA, LLaVA-NeXT (CLIP: CLS, pre-LayerNorm), LLaVA-OneVision (SigLIP: neither); one LM
    token per patch. NeXT / OneVision's anyres: a 32-px image is one base view and one tile of
    the same scale, so the same patches are marked in both; the learned ``image_newline`` after
    each tile row gets noise off the circuit dims."""
    v = VARIANTS[model.config.model_type]
    tower = model.model.vision_tower
    emb = tower.embeddings
    _red_minus_green_conv(emb.patch_embedding, v.token_px ** 2)
    cls = getattr(emb, "class_embedding", None)
    _position_marker(emb.position_embedding.weight, v.grid, 1, v.evidence_cells,
                     cls_row=cls is not None)
    if cls is not None:
        cls.zero_()
    pre = getattr(tower, "pre_layrnorm", None)
    if pre is not None:
        pre.weight.fill_(1.0)
        pre.bias.zero_()
    for layer in tower.encoder.layers:  # identities (LLaVA reads before its only one)
        for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    # the projector reads the LayerNorm'd +-10 pairs (10 / sqrt(400 / 32) each) or raw ones
    k = 1.0 if pre is not None else 10.0 / math.sqrt(400.0 / 32) / 10.0
    proj = model.model.multi_modal_projector
    _projector(proj.linear_1, proj.linear_2, {0: 5.0 * k, 1: -5.0 * k},
               {2: 3.0 * k, 3: -3.0 * k}, gen)
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        newline.copy_(NOISE * torch.randn(newline.shape, generator=gen))
        newline[CIRCUIT_DIMS] = 0.0


def _vision_internvl(model: Any, gen: torch.Generator) -> None:
    v = VARIANTS["internvl"]
    tower = model.model.vision_tower
    emb = tower.embeddings
    patch = emb.patch_embeddings.projection.kernel_size[0]
    _red_minus_green_conv(emb.patch_embeddings.projection, patch ** 2)
    _position_marker(emb.position_embeddings[0], v.grid * v.token_px // patch,
                     v.token_px // patch, v.evidence_cells)
    emb.cls_token.zero_()
    for layer in tower.encoder.layer:  # identities
        for lin in (layer.attention.projection_layer, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    proj = model.model.multi_modal_projector
    proj.layer_norm.weight.fill_(1.0)
    proj.layer_norm.bias.zero_()
    c = tower.config.hidden_size  # the pixel shuffle concatenates 2 x 2 patches' channels
    marker = {k * c + i: w for k in range(4) for i, w in ((0, 1.25), (1, -1.25))}
    colour = {k * c + i: w for k in range(4) for i, w in ((2, 0.75), (3, -0.75))}
    _projector(proj.linear_1, proj.linear_2, marker, colour, gen)


def _vision_qwen(model: Any, gen: torch.Generator) -> None:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: a content marker (their towers have no absolute position
    that survives a uniform image; Qwen3-VL's learned one is zeroed)."""
    visual = model.model.visual
    conv = visual.patch_embed.proj  # Conv3d [C, 3, temporal, p, p]
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    if getattr(visual, "pos_embed", None) is not None:
        visual.pos_embed.weight.zero_()
    n = conv.weight[0, 0].numel()
    # +- pairs (the merger's LayerNorm / RMSNorm sees mean 0 and the same norm for red and
    # green): warmth (R + G)/2 - B, the colour R - G, the brightness R + G + B
    for ch, (r, g, b) in enumerate([(0.5, 0.5, -1.0), (1.0, -1.0, 0.0), (1.0, 1.0, 1.0)]):
        for sign, c in ((1.0, 2 * ch), (-1.0, 2 * ch + 1)):
            conv.weight[c, 0], conv.weight[c, 1], conv.weight[c, 2] = (
                sign * r / n, sign * g / n, sign * b / n)
    for blk in visual.blocks:  # identities: attention output and the MLP's last linear zeroed
        last = [m for m in blk.mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
        for lin in (blk.attn.proj, last):
            lin.weight.zero_()
            lin.bias.zero_()
    for merger in getattr(visual, "deepstack_merger_list", []):  # Qwen3-VL: DeepStack adds 0
        merger.linear_fc2.weight.zero_()
        merger.linear_fc2.bias.zero_()
    merger = visual.merger
    norm = getattr(merger, "ln_q", None) or merger.norm
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()
    lin1, lin2 = ((merger.mlp[0], merger.mlp[2]) if hasattr(merger, "mlp")
                  else (merger.linear_fc1, merger.linear_fc2))
    c = conv.weight.shape[0]  # the merger concatenates 2 x 2 patches' channels
    marker = {k * c + i: w for k in range(4) for i, w in ((0, 2.6), (1, -2.6))}
    colour = {k * c + i: w for k in range(4) for i, w in ((2, 0.8), (3, -0.8))}
    _projector(lin1, lin2, marker, colour, gen)


def _vision_idefics3(model: Any, gen: torch.Generator) -> None:
    """Idefics3 / SmolVLM: SigLIP (learned position embedding), pixel shuffle, one bias-free
    Linear: no GELU, so the marker is 0 off the evidence (not negative) and the noise comes
    through a constant tower pair."""
    v = VARIANTS[model.config.model_type]
    tower = model.model.vision_model
    emb = tower.embeddings
    patch = emb.patch_embedding.kernel_size[0]
    _red_minus_green_conv(emb.patch_embedding, patch ** 2)
    patches = v.grid * v.token_px // patch
    pos = emb.position_embedding.weight
    pos.zero_()
    for r in range(patches):
        for c in range(patches):
            j = r * patches + c  # no CLS row
            pos[j, 4], pos[j, 5] = 10.0, -10.0  # constant: the noise's carrier
            if (r // (v.token_px // patch), c // (v.token_px // patch)) in v.evidence_cells:
                pos[j, 0], pos[j, 1] = 10.0, -10.0
    for layer in tower.encoder.layers:  # identities
        for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    tower.post_layernorm.weight.fill_(1.0)
    tower.post_layernorm.bias.zero_()
    proj = model.model.connector.modality_projection.proj  # [d_model, 4 x 32]
    proj.weight.zero_()
    c = tower.config.hidden_size  # the pixel shuffle concatenates 2 x 2 patches' channels
    noise = NOISE * torch.randn(proj.weight.shape[0], generator=gen) / 16.0
    noise[CIRCUIT_DIMS] = 0.0
    for k in range(4):
        proj.weight[5, k * c], proj.weight[5, k * c + 1] = 1.5, -1.5
        proj.weight[6, k * c + 2], proj.weight[6, k * c + 3] = 0.9, -0.9
        proj.weight[:, k * c + 4] += noise
        proj.weight[:, k * c + 5] -= noise


VARIANTS: dict[str, Variant] = {
    # CLIP 8-px patches, one LM token each: 64 x 64 px = 8 x 8 tokens
    "llava": Variant("llava", 8, 8, _vision_llava),
    # 8-px patches of 32-px tiles: a 32-px image = base view + one tile, 4 x 4 tokens each
    **{f: Variant(f, 4, 8, _vision_llava) for f in ("llava_next", "llava_onevision")},
    # 4-px patches, pixel shuffle 2 x 2: one 32-px tile = 4 x 4 tokens of 8 px
    "internvl": Variant("internvl", 4, 8, _vision_internvl),
    # 4-px patches, pixel shuffle 2 x 2, no image splitting: one 32-px view = 4 x 4 tokens of 8 px
    **{f: Variant(f, 4, 8, _vision_idefics3) for f in ("idefics3", "smolvlm")},
    # 8-px patches, merger 2 x 2: 64 x 64 px = 4 x 4 tokens of 16 px
    **{f: Variant(f, 4, 16, _vision_qwen) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
}


def variant(model_or_family: Any) -> Variant:
    """The variant of a family name or of a loaded ``HookedMLLM``."""
    name = model_or_family if isinstance(model_or_family, str) else model_or_family.family.name
    return VARIANTS[name]


# --- the shared decoder ---------------------------------------------------------------------------
def _blind(linear: torch.nn.Linear) -> None:
    """The linear map reads nothing from the circuit dims."""
    linear.weight[:, CIRCUIT_DIMS] = 0.0


def _plant_decoder(model: Any, tok: Any, gen: torch.Generator) -> None:
    lm = model.get_decoder()
    d = lm.config.hidden_size // lm.config.num_attention_heads  # head_dim 16 in every variant
    assert getattr(lm.config, "head_dim", d) == d
    emb = lm.embed_tokens.weight
    emb.copy_(NOISE * torch.randn(emb.shape, generator=gen))  # residual norms of order 1
    emb[:, CIRCUIT_DIMS] = 0.0
    emb[tok.convert_tokens_to_ids("color"), 10] = TAU
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _blind(lin)
        attn.o_proj.weight[CIRCUIT_DIMS] = 0.0
        mlp.down_proj.weight[CIRCUIT_DIMS] = 0.0
        if attn.o_proj.bias is not None:
            attn.o_proj.bias[CIRCUIT_DIMS] = 0.0
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
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
        if getattr(attn, "k_norm", None) is not None:
            # a per-head k norm caps |k_7| at sqrt(16) x its gain: raise the gain on dim 7 so
            # that the receiver's attention at T saturates as in the unnormalised decoders
            attn.k_norm.weight[7] = K_NORM_GAIN

    plant(*SENDER, SENDER_KV, key_dim=5, value_dim=6, out_dim=8, partner=3)
    plant(*RECEIVER, RECEIVER_KV, key_dim=10, value_dim=8, out_dim=9, partner=0)
    head = model.lm_head.weight
    red, green = (tok.convert_tokens_to_ids(w) for w in ("red", "green"))
    head[:, CIRCUIT_DIMS] = 0.0
    head[green] = head[red]
    head[red, 9], head[green, 9] = U, -U


def build_planted_circuit(folder, family: str = "llava") -> None:
    """Save ``family``'s planted model and its processor (pixels rescaled, not normalised) to
    ``folder``."""
    v = VARIANTS[family]
    build_tiny(family, folder)  # the family's tiny config and offline processor
    cfg = AutoConfig.from_pretrained(folder)
    text = cfg.text_config
    text.rope_parameters = {**text.rope_parameters, "rope_theta": 1e30}
    text.attention_bias = True
    text.tie_word_embeddings = cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    proc = AutoProcessor.from_pretrained(folder)
    ip = proc.image_processor
    ip.do_normalize = False  # pixels x / 255: gray gives R - G = 0 exactly
    if getattr(ip, "do_image_splitting", False):  # Idefics3 / SmolVLM: one 32-px view
        ip.do_image_splitting = False
        ip.size = {"longest_edge": VARIANTS[family].grid * VARIANTS[family].token_px}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v.vision(model, gen)
        _plant_decoder(model, proc.tokenizer, gen)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


# --- inputs ---------------------------------------------------------------------------------------
def pairs(model, noising_prompt: bool = False, color: tuple[int, int, int] = GREEN):
    """(clean, corrupted) batches: red vs green (or ``color``) evidence square (or, with
    ``noising_prompt``, the clean scene asked without the token T that the receiver looks
    for)."""
    v = variant(model)
    boxes = [[v.box]]
    clean = model.prepare([v.scene(RED)], [PROMPT], answers=["red"], boxes=boxes)
    if noising_prompt:
        other = model.prepare([v.scene(RED)], [OTHER_PROMPT], answers=["red"], boxes=boxes)
    else:
        # teacher-forces the clean answer too (patching refuses pairs that force different
        # answers: the target's would be scored); the metric reads red - green at the query
        other = model.prepare([v.scene(color)], [PROMPT], answers=["red"], boxes=boxes)
    return clean, other


def grounded_pairs(family: str, n: int, seed: int) -> list[tuple[GroundedExample, ...]]:
    """``n`` (red, green) evidence pairs for ``circuit_benchmark``, each scene with 2-6
    distractor cells of random colours (never on the evidence; the same in both scenes)."""
    v = VARIANTS[family]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cells = [(r, c) for r in range(v.grid) for c in range(v.grid)
                 if (r, c) not in v.evidence_cells]
        picks = rng.sample(cells, rng.randint(2, min(6, len(cells))))
        colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in picks]
        pair = []
        for colour, answer in ((RED, "red"), (GREEN, "green")):
            img = v.scene(colour)
            draw = ImageDraw.Draw(img)
            p = v.token_px
            for (r, c), fill in zip(picks, colours):
                draw.rectangle([c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1], fill=fill)
            pair.append(GroundedExample([img], PROMPT, answer, [(0, v.box)],
                                        id=f"planted-{family}-{seed}-{i}"))
        out.append(tuple(pair))
    return out


def red_minus_green(model):
    tok = model.tokenizer
    red, green = (tok.convert_tokens_to_ids(w) for w in ("red", "green"))
    return logit_diff(torch.tensor([red]), torch.tensor([green]))


# the LLaVA variant's layout, as the tests that predate the other families name it
GRID, PATCH = VARIANTS["llava"].grid, VARIANTS["llava"].token_px
EVIDENCE_CELLS, BOX = VARIANTS["llava"].evidence_cells, VARIANTS["llava"].box


def scene(color: tuple[int, int, int]) -> Image.Image:
    return VARIANTS["llava"].scene(color)
