"""The tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (``corelens.families.qwen_vl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from corelens.zoo.tokenizer import build_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 8-px patches, 2x2 merge -> one LM token per 16x16 resized pixels
TINY_PATCH, TINY_MERGE = 8, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 16 * 16 * 4, 64 * 64

# resized (w x h) and LM tokens (rows x cols) with the tiny processor: 80x50 -> 80x48
# (3x5); 40x90 -> 32x96 (6x2); 100x60 hits max_pixels -> 80x48 (3x5); 30x20 hits
# min_pixels -> 48x32 (2x3)
IMAGE_SIZES = [(80, 50), (40, 90), (100, 60), (30, 20)]


# --- the pieces every tiny Qwen-VL shares ------------------------------------------------------
def token_ids(tok: Any) -> dict[str, int]:
    """The image / video / vision start-end token ids of a Qwen-VL config, from ``tok``."""
    return {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}


def _text_ids(tok: Any) -> dict[str, Any]:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))


def _text_config(tok: Any, **kw: Any) -> dict[str, Any]:
    """The tiny decoder every Qwen-VL test model shares (``kw`` adds or overrides)."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},  # sums to head_dim 16 / 2
                **_text_ids(tok))
    text.update(kw)
    return text


def _image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(patch_size=TINY_PATCH, merge_size=TINY_MERGE,
                                    temporal_patch_size=2, min_pixels=TINY_MIN_PIXELS,
                                    max_pixels=TINY_MAX_PIXELS)


def _qwen2_processor(processor_class: Any, tok: Any) -> Any:
    """A Qwen2-VL-style processor (``processor_class``) with Qwen2-VL's video processor."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vp = Qwen2VLVideoProcessor(patch_size=TINY_PATCH, merge_size=TINY_MERGE,
                               temporal_patch_size=2, min_pixels=TINY_MIN_PIXELS,
                               max_pixels=TINY_MAX_PIXELS)
    return processor_class(image_processor=_image_processor(), tokenizer=tok,
                           video_processor=vp, chat_template=CHAT_TEMPLATE)


def _build(folder: str | Path, seed: int, patch_local: bool, config: Callable[[Any], Any],
           model_class: Any, processor: Callable[[Any], Any]) -> None:
    """Save ``model_class(config(tok))`` (seeded) and ``processor(tok)`` to ``folder``.

    ``patch_local``: every vision block's attention output projection is zeroed, so each patch
    (and, after the merger, each LM token, DeepStack features included) depends only on its own
    pixels and its position."""
    tok = build_tokenizer(folder, add_bos=False)
    cfg = config(tok)
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    if patch_local:
        with torch.no_grad():
            for blk in model.model.visual.blocks:
                blk.attn.proj.weight.zero_()
                blk.attn.proj.bias.zero_()
    model.save_pretrained(folder)
    processor(tok).save_pretrained(folder)


# --- Qwen2-VL ------------------------------------------------------------------------------------
def qwen2_vl_config(tok: Any) -> Any:
    from transformers import Qwen2VLConfig

    # vision hidden_size is the LM width the merger projects to; embed_dim the tower's
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                  patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision, text_config=_text_config(tok), **token_ids(tok))


def qwen2_vl_processor(tok: Any) -> Any:
    from transformers import Qwen2VLProcessor

    return _qwen2_processor(Qwen2VLProcessor, tok)


def build_qwen2_vl(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random Qwen2-VL and its offline processor to ``folder``."""
    from transformers import Qwen2VLForConditionalGeneration

    _build(folder, seed, patch_local, qwen2_vl_config, Qwen2VLForConditionalGeneration,
           qwen2_vl_processor)


# --- Qwen2.5-VL ----------------------------------------------------------------------------------
def qwen2_5_vl_config(tok: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    # window_size 32 px = 2x2 LM tokens per window: the tiny images need window reordering
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE, temporal_patch_size=2,
                  out_hidden_size=64, window_size=32, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(vision_config=vision, text_config=_text_config(tok),
                            **token_ids(tok))


def qwen2_5_vl_processor(tok: Any) -> Any:
    from transformers import Qwen2_5_VLProcessor

    return _qwen2_processor(Qwen2_5_VLProcessor, tok)


def build_qwen2_5_vl(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random Qwen2.5-VL and its offline processor to ``folder``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _build(folder, seed, patch_local, qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration,
           qwen2_5_vl_processor)


# --- Qwen3-VL ------------------------------------------------------------------------------------
def qwen3_vl_config(tok: Any) -> Any:
    from transformers import Qwen3VLConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE, temporal_patch_size=2,
                  out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # injected after decoder layer 0
    text = _text_config(tok, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
        "mrope_interleaved": True})
    return Qwen3VLConfig(vision_config=vision, text_config=text, **token_ids(tok))


def qwen3_vl_processor(tok: Any) -> Any:
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # Qwen3-VL's video budget counts the pixels of all frames: room for ~8 tiny frames
    vp = Qwen3VLVideoProcessor(patch_size=TINY_PATCH, merge_size=TINY_MERGE,
                               temporal_patch_size=2,
                               size={"shortest_edge": TINY_MIN_PIXELS,
                                     "longest_edge": 8 * TINY_MAX_PIXELS})
    return Qwen3VLProcessor(image_processor=_image_processor(), tokenizer=tok,
                            video_processor=vp, chat_template=CHAT_TEMPLATE)


def build_qwen3_vl(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random Qwen3-VL (DeepStack after decoder layer 0) and its offline processor
    to ``folder``."""
    from transformers import Qwen3VLForConditionalGeneration

    _build(folder, seed, patch_local, qwen3_vl_config, Qwen3VLForConditionalGeneration,
           qwen3_vl_processor)
