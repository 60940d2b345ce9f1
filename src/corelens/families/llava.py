"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama decoder.

Geometry: optional pad-to-square, resize (shortest edge), centre crop, then a square grid of
``patch_size`` cells; the ``default`` feature strategy drops CLS, ``full`` keeps it first.
"""

from __future__ import annotations

from typing import Any

import torch

from corelens.data.layout import KIND_NEWLINE, FeatureRows, ViewGeometry
from corelens.families.base import Family
from corelens.families.geometry import Affine, pad_to_square_offsets, resize_and_crop


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


def cls_tokens(vision_config: Any) -> int:
    """CLIP towers put a CLS token before the patches; SigLIP towers do not."""
    return 1 if "clip" in str(getattr(vision_config, "model_type", "")) else 0


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

    def tower_grids(self, hf_config, processor, inputs, image, size):
        a = processed_affine(processor.image_processor, size)
        return [grid_view("image", a, hf_config.vision_config.patch_size, size)]

    def tower_prefix(self, hf_config):
        return cls_tokens(hf_config.vision_config)
