"""The tiny random LLaVA-1.5 model (``corelens.families.llava``) for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from corelens.zoo.tokenizer import build_tokenizer

# the chat template of every tiny model that takes ``<image>`` / ``<video>`` as its own tokens
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
    "{% elif c['type'] == 'video' %} <video>"
    "{% else %} {{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)

IMAGE_SIZES = [(80, 50), (40, 70)]


def build(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random LLaVA and its offline processor to ``folder``."""
    # A 1-layer tower read at vision_feature_layer=-2 is already patch-local.
    model, proc = tiny_llava(folder, seed=seed)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


def tiny_llava(
    folder: str | Path,
    *,
    seed: int = 0,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 64,
    patch: int = 8,
    center_crop: bool = True,
    vision: dict[str, Any] | None = None,
    **text_kw: Any,
) -> tuple[Any, Any]:
    """A random LLaVA (1-layer CLIP tower read at layer -2, so patch-local; Llama decoder of
    the given shape) and its offline processor; the tokenizer is saved to ``folder``. Extra
    keyword arguments go to the ``LlamaConfig``, ``vision`` to the ``CLIPVisionConfig`` (e.g.
    CLIP-L/14-336's widths for a real-size model)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = build_tokenizer(folder)
    vc = CLIPVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=image_size,
                                    patch_size=patch), **(vision or {})})
    text = dict(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=d_model // heads, vocab_size=len(tok), max_position_embeddings=512)
    text.update(text_kw)
    cfg = LlavaConfig(vision_config=vc, text_config=LlamaConfig(**text),
                      image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    if center_crop:
        ip = LlavaImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    else:
        ip = LlavaImageProcessorPil(size={"height": image_size, "width": image_size},
                                    do_center_crop=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=SIMPLE_CHAT_TEMPLATE)
    return model, proc
