"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP tower, MLP projector, Llama/Mistral
decoder, "anyres" tiling.

Geometry of one image (what ``LlavaNextModel.pack_image_features`` scatters, in order) -- the
same as LLaVA-OneVision's tiled path (``corelens.families.onevision``), whose code this family
reuses, with two differences read off HF 5.23:

1. the *base* view: the whole image squashed to ``size_tuple`` (``shortest_edge`` x
   ``shortest_edge`` for the usual CLIP settings), then the per-tile resize and centre crop, a
   square grid of ``image_size // patch_size`` tokens per side, no newlines;
2. the *anyres* view: the image resized to fit the best pinpoint resolution, centred on a zero
   canvas, cut into tiles; the tiles' token grids joined into one grid, the rows/cols in the
   canvas padding dropped (``unpad_image``, in token units), an ``image_newline`` row after each
   grid row. There is NO ``anyres_max`` bilinear downsampling (that is OneVision's), and every
   image is tiled, whatever the number of images in its example (no ``batch_num_images``): the
   processor always makes a base + at least one tile, so HF's single-tile branch (one trailing
   newline) is never taken.

The ``default`` feature strategy drops the CLS token of each tile (CLIP towers); a CLS-less
tower needs ``full``. Every token's box is mapped back to original-image pixels through the
resize, canvas padding and tiling; ``tests/test_families.py`` checks it with the painted-region
test on a patch-local tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from corelens.families.llava import SIMPLE_CHAT_TEMPLATE
from corelens.families.onevision import LlavaOnevision

# Tiny-model settings (tests): 32-px tiles of 8-px CLIP patches (4 x 4 tokens per tile).
TINY_TILE = 32
TINY_PATCH = 8
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # (h, w)


class LlavaNext(LlavaOnevision):
    """OneVision's anyres geometry without its downsampling and multi-image special case."""

    name = "llava_next"
    hf_architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    modeling = "transformers.models.llava_next.modeling_llava_next"
    supports_video = False  # LlavaNextForConditionalGeneration takes no videos

    @staticmethod
    def _needs_patching(inputs: dict[str, Any], image: int) -> bool:
        return True  # LLaVA-NeXT tiles every image, alone in its example or not

    @staticmethod
    def _max_num_patches(hf_config: Any, processor: Any, where: str) -> int | None:
        return None  # no anyres_max downsampling in LlavaNextModel.pack_image_features

    def build_tiny(self, folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
        # patch_local: a 1-layer CLIP tower read at vision_feature_layer=-2 (patch + position
        # embeddings after the pre-layernorm); otherwise 2 layers read at -1 (patches mix).
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

        from corelens.zoo.tokenizer import build_tokenizer

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

    def tiny_image_sizes(self) -> list[tuple[int, int]]:
        # 32-px tiles, 4 x 4 tokens each; anyres grid (rows x cols) after unpadding:
        # (80, 50): 2 x 2 tiles, 1 token row cut each side -> 6 x 8;
        # (40, 70): 2 x 2 tiles, 2 token cols cut each side -> 8 x 4;
        # (90, 28): 1 x 3 tiles, nothing cut -> 4 x 12; (60, 32): 1 x 2 tiles -> 4 x 8.
        return [(80, 50), (40, 70), (90, 28), (60, 32)]
