"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, pooled projector, Gemma 3 decoder.

Geometry: the image processor resizes every image to the tower's square (``size = {height,
width}``, aspect NOT kept: no padding, no crop); SigLIP cuts ``image_size // patch_size`` patches
per side; ``Gemma3MultiModalProjector`` average-pools them with a ``kernel x kernel`` window
(``kernel = patches_per_side // sqrt(mm_tokens_per_image)``, stride = kernel) into a square grid
of ``sqrt(mm_tokens_per_image)`` tokens per side, row-major. A token's box is its
``kernel * patch_size`` square of the resized image, scaled back to original pixels per axis
(when ``patches_per_side`` is not a multiple of the grid side, the pooling drops the last
patches, and so do the boxes). The prompt holds ``<start_of_image>``, the pooled tokens
(``image_token_id``), ``<end_of_image>``: only the pooled tokens are feature rows (V_e); the
delimiters are text.

Pan-and-scan (``do_pan_and_scan=True``, off by default; e.g. ``AutoProcessor.from_pretrained(
..., do_pan_and_scan=True)`` -- the processor passes its own ``images_kwargs`` at call time, so
setting the attribute on the image processor alone does nothing, and corelens reads the
settings the same way, through ``compat.processor_images_kwargs``): an image whose
aspect ratio reaches ``pan_and_scan_min_ratio_to_activate`` is also cut, along its long side,
into 2 .. ``pan_and_scan_max_num_crops`` equal crops (``ceil(side / n)`` px each, the last one
clipped at the edge; none if a crop would be under ``pan_and_scan_min_crop_size``), and every
crop is squashed to the tower's square like the image itself. The prompt then reads "Here is the
original image <boi>[tokens]<eoi> and here are some crops to help you see better <boi>[tokens]
<eoi> <boi>...": one full image sequence for the base image and one per crop, in crop order
(row-major), each bidirectional in itself. corelens lays the image out as the view ``image``
(the base) followed by the views ``crop0``, ``crop1``, ...: a crop token's box is its cell of the
crop, mapped back to original pixels; the text between the sequences is text (not V_e). The
crops are computed with the image processor's own ``pan_and_scan`` (PIL backend) /
``pan_and_scan_batched`` (torchvision backend) on an empty array of the image's size, so corelens
follows HF's arithmetic; HF drops ``num_crops`` from the processor's output, and the layout
checks its token counts against ``input_ids`` instead.

Decoder: the processor returns ``token_type_ids`` (1 on the pooled image tokens); HF turns them
into a mask where each image's tokens attend to each other bidirectionally (causal elsewhere),
intersected with the sliding window on ``sliding_attention`` layers (``layer_types``). corelens's
attention uses that HF-built mask as is, HF's ``scaling = query_pre_attn_scalar ** -0.5`` and the
per-head ``q_norm``/``k_norm``, and the per-layer-type rotary embedding HF passes each layer
(local and global RoPE bases differ). ``prepare`` passes ``token_type_ids`` through with the
other processor outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from corelens import compat
from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.families.base import Family
from corelens.families.geometry import Affine, resize_output_size


class Gemma3(Family):
    name = "gemma3"
    resolution_settings = ("do_pan_and_scan", "pan_and_scan_max_num_crops",
                           "pan_and_scan_min_crop_size")
    hf_architectures = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    bidirectional_image_blocks = True  # HF's mask: each image block attends both ways
    sandwich_norms = True  # pre/post-feedforward (and post-attention) norms around each sublayer

    def feature_rows(self, hf_config, processor, inputs, image, size):
        where = f"{self.name}: image {image} (size {size[0]}x{size[1]})"
        ip = processor.image_processor
        vc = hf_config.vision_config
        rw, rh = resize_output_size(*size, ip.size) if getattr(ip, "do_resize", True) else size
        if (rw, rh) != (vc.image_size, vc.image_size):
            raise ValueError(f"{where}: the processor resizes to {rw}x{rh} but the tower takes "
                             f"{vc.image_size} px; corelens does not understand this processor")
        pixels = inputs.get("pixel_values")
        if pixels is not None and tuple(pixels.shape[-2:]) != (rh, rw):
            raise ValueError(f"{where}: processed image is {tuple(pixels.shape[-2:])} (h, w), "
                             f"expected {(rh, rw)}")
        per_side = int(vc.image_size // vc.patch_size)
        side = int(hf_config.mm_tokens_per_image ** 0.5)
        if side * side != hf_config.mm_tokens_per_image:
            raise ValueError(f"{where}: mm_tokens_per_image={hf_config.mm_tokens_per_image} is "
                             "not a square; HF's projector cannot pool to it either")
        seq = getattr(processor, "image_seq_length", side * side)
        if seq != side * side:
            raise ValueError(f"{where}: the processor writes {seq} image tokens per image but "
                             f"the projector pools to {side * side}")
        cell = float((per_side // side) * vc.patch_size)

        def grid(name: str, a: Affine) -> FeatureRows:
            scale, offset = a.resize((rw, rh)).inverse()
            return FeatureRows.grid(ViewGeometry.from_affine(name, side, side, (cell, cell),
                                                             scale, offset, size))

        return FeatureRows.concat([grid(name, a) for name, a in self._pictures(processor, size)])

    def _pictures(self, processor: Any, size: tuple[int, int]) -> list[tuple[str, Affine]]:
        """(name, original -> picture pixels before the resize) of the image and its crops."""
        base = Affine.identity(size)
        return [("image", base)] + [(f"crop{k}", base.crop(x, y, (w, h))) for k, (x, y, w, h)
                                    in enumerate(self.pan_and_scan_crops(processor, size))]

    def tower_grids(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        side, patch = int(vc.image_size // vc.patch_size), int(vc.patch_size)
        out = []
        for name, a in self._pictures(processor, size):
            scale, offset = a.resize((int(vc.image_size), int(vc.image_size))).inverse()
            out.append(ViewGeometry.from_affine(name, side, side, (patch, patch), scale, offset,
                                                size))
        return out

    def tower_merge(self, hf_config):
        per_side = int(hf_config.vision_config.image_size // hf_config.vision_config.patch_size)
        return per_side // int(hf_config.mm_tokens_per_image ** 0.5)

    @staticmethod
    def pan_and_scan_crops(processor: Any, size: tuple[int, int]
                           ) -> list[tuple[int, int, int, int]]:
        """The pan-and-scan crops of an image of ``size = (w, h)`` as ``(left, top, width,
        height)`` in original pixels, in the processor's order ([] when off / not triggered)."""
        ip = processor.image_processor
        keys = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")
        # what the processor's call passes the image processor (its own merge of processor
        # attributes, tokenizer init kwargs and defaults); None: the image processor's own
        merged = compat.processor_images_kwargs(processor)
        if merged is None:
            merged = getattr(processor, "images_kwargs", {}) or {}
        kw = {k: merged[k] if merged.get(k) is not None else getattr(ip, k, None) for k in keys}
        if not kw.pop("do_pan_and_scan"):
            return []
        for k, v in kw.items():
            if v is None:
                raise ValueError(f"gemma3: pan-and-scan is on but {k} is not set")
        w, h = size
        if hasattr(ip, "pan_and_scan_batched"):  # torchvision backend
            crops = ip.pan_and_scan_batched(torch.empty(0, h, w), **kw)
        elif hasattr(ip, "pan_and_scan"):  # PIL backend
            crops = ip.pan_and_scan(image=np.empty((0, h, w)), **kw)
        else:
            raise ValueError(f"gemma3: {type(ip).__name__} has no pan_and_scan; corelens "
                             "cannot lay out its crops")
        if not crops:
            return []
        ch, cw = (int(v) for v in crops[0].shape[-2:])
        along_w = cw < w  # HF splits one side only: the long one
        out = []
        for k, c in enumerate(crops):
            x, y = (k * cw, 0) if along_w else (0, k * ch)
            out.append((x, y, int(c.shape[-1]), int(c.shape[-2])))
        return out
