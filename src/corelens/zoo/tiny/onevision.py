"""The tiny random LLaVA-OneVision model (``corelens.families.onevision``) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from corelens.zoo.tiny.llava import SIMPLE_CHAT_TEMPLATE
from corelens.zoo.tokenizer import build_tokenizer

TINY_TILE = 32  # tile / base side in pixels (= vision image_size)
TINY_PATCH = 8  # vision patch: 4 x 4 tokens per tile
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # (h, w)
# anyres_max_2: an unpadded grid of more than 1.1^2 * 2 * 16 = 38.7 tokens is shrunk, so the
# tiny sizes exercise both the plain and the downsampled path (the real models use _9).
TINY_ASPECT = "anyres_max_2"

# (80, 50): 2 x 2 tiles, 1 token row of padding cut each side, 6 x 8 shrunk to 4 x 6;
# (40, 70): 2 x 2 tiles, 2 padding cols cut each side, 8 x 4 kept (not shrunk);
# (90, 28): 1 x 3 tiles, nothing cut, 4 x 12 shrunk to 3 x 9;
# (60, 32): 1 x 2 tiles, 4 x 8, neither cut nor shrunk.
IMAGE_SIZES = [(80, 50), (40, 70), (90, 28), (60, 32)]


def build(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random LLaVA-OneVision and its offline processor to ``folder``.

    ``patch_local``: a 1-layer tower read at vision_feature_layer=-2 (the patch + position
    embeddings); otherwise 2 layers read at -1, so patches mix as in the real model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    tok = build_tokenizer(folder)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1 if patch_local else 2, num_attention_heads=2,
                            image_size=TINY_TILE, patch_size=TINY_PATCH, vision_use_head=False)
    tc = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=len(tok), max_position_embeddings=512)
    cfg = LlavaOnevisionConfig(
        vision_config=vc, text_config=tc,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2 if patch_local else -1,
        vision_feature_select_strategy="full", image_grid_pinpoints=TINY_PINPOINTS,
        vision_aspect_ratio=TINY_ASPECT, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    square = {"height": TINY_TILE, "width": TINY_TILE}
    ip = LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=TINY_PINPOINTS)
    vp = LlavaOnevisionVideoProcessor(size=square)
    proc = LlavaOnevisionProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp,
        num_image_tokens=(TINY_TILE // TINY_PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=TINY_ASPECT, chat_template=SIMPLE_CHAT_TEMPLATE)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
