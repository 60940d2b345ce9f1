"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder.

Geometry: optional pad-to-square, resize (shortest edge), centre crop, then a square grid of
``patch_size`` cells; the ``default`` feature strategy drops CLS, ``full`` keeps it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from corelens.families.base import Family
from corelens.families.geometry import Affine, pad_to_square_offsets, resize_and_crop
from corelens.layout import KIND_NEWLINE, FeatureRows, ViewGeometry

SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def processed_affine(ip: Any, size: tuple[int, int]) -> Affine:
    """original -> processed pixels for a LLaVA/CLIP-style image processor."""
    a = Affine.identity(size)
    if getattr(ip, "do_pad", False):
        left, top, m = pad_to_square_offsets(*a.size)
        a = a.pad(left, top, (m, m))
    return resize_and_crop(ip, a)


def grid_view(name: str, a: Affine, patch: int, size: tuple[int, int]) -> ViewGeometry:
    w, h = a.size
    scale, offset = a.inverse()
    return ViewGeometry.from_affine(name, h // patch, w // patch, (patch, patch), scale, offset,
                                    size)


class Llava(Family):
    name = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    def feature_rows(self, hf_config, processor, inputs, image, size):
        a = processed_affine(processor.image_processor, size)
        got = tuple(inputs["pixel_values"][image].shape[-2:])
        if got != (a.size[1], a.size[0]):
            raise ValueError(
                f"llava: processed image {image} is {got} (h, w) but the processor settings "
                f"predict {(a.size[1], a.size[0])}; corelens does not understand this processor"
            )
        view = grid_view("image", a, hf_config.vision_config.patch_size, size)
        rows = FeatureRows.grid(view)
        if hf_config.vision_feature_select_strategy == "full":  # CLS feature first
            cls = FeatureRows(torch.tensor([KIND_NEWLINE]), torch.tensor([-1]),
                              torch.tensor([-1]), torch.tensor([-1]), [])
            rows = FeatureRows.concat([cls, rows])
        return rows

    def build_tiny(self, folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
        # A 1-layer tower read at vision_feature_layer=-2 is already patch-local.
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        from corelens.zoo.tokenizer import build_tokenizer

        tok = build_tokenizer(folder)
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=64, patch_size=8)
        tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=len(tok), max_position_embeddings=512)
        cfg = LlavaConfig(vision_config=vc, text_config=tc,
                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu")
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
        ip = LlavaImageProcessorPil(size={"shortest_edge": 64},
                                    crop_size={"height": 64, "width": 64})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=SIMPLE_CHAT_TEMPLATE)
        model.save_pretrained(folder)
        proc.save_pretrained(folder)
