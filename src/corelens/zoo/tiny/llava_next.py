"""The tiny random LLaVA-NeXT model (``corelens.families.llava_next``) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from corelens.zoo.tiny.llava import SIMPLE_CHAT_TEMPLATE
from corelens.zoo.tokenizer import build_tokenizer

# 32-px tiles of 8-px CLIP patches (4 x 4 tokens per tile).
TINY_TILE = 32
TINY_PATCH = 8
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # (h, w)

# 32-px tiles, 4 x 4 tokens each; anyres grid (rows x cols) after unpadding:
# (80, 50): 2 x 2 tiles, 1 token row cut each side -> 6 x 8;
# (40, 70): 2 x 2 tiles, 2 token cols cut each side -> 8 x 4;
# (90, 28): 1 x 3 tiles, nothing cut -> 4 x 12; (60, 32): 1 x 2 tiles -> 4 x 8.
IMAGE_SIZES = [(80, 50), (40, 70), (90, 28), (60, 32)]


def build(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random LLaVA-NeXT and its offline processor to ``folder``.

    ``patch_local``: a 1-layer CLIP tower read at vision_feature_layer=-2 (patch + position
    embeddings after the pre-layernorm); otherwise 2 layers read at -1 (patches mix)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = build_tokenizer(folder)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1 if patch_local else 2, num_attention_heads=2,
                          image_size=TINY_TILE, patch_size=TINY_PATCH)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=len(tok), max_position_embeddings=512)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc,
                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2 if patch_local else -1,
                          vision_feature_select_strategy="default",
                          image_grid_pinpoints=TINY_PINPOINTS, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": TINY_TILE},
                                    crop_size={"height": TINY_TILE, "width": TINY_TILE},
                                    image_grid_pinpoints=TINY_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=TINY_PATCH,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1,
                              chat_template=SIMPLE_CHAT_TEMPLATE)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
