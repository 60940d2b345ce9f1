"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM
(``SmolVLMForConditionalGeneration``): SigLIP-style tower, pixel-shuffle connector, Llama
decoder (SmolLM2 in the public checkpoints).

Geometry of one image (what the image processor does, then ``get_image_features``):

1. resize so the longest edge is ``size["longest_edge"]`` (up- or down-scaling; the other edge is
   ``int(edge / aspect)`` rounded up to even), capped at 4096 px (HF's
   ``get_resize_output_image_size``);
2. with ``do_image_splitting``: resize again to multiples of the tile side
   ``T = max_image_size["longest_edge"]`` (``resize_for_vision_encoder``: the longer edge rounded
   up, the other ``int(longer / aspect)`` rounded up); if either edge exceeds ``T`` the image is cut
   into ``rows x cols`` tiles of ``T x T`` (row-major) and the whole image squashed to ``T x T`` is
   appended as the *global* view; otherwise the ``T x T`` image is the only (global) view.
   Without splitting: the image is squashed to ``T x T`` (global view only);
3. every view goes through the tower (``T / patch`` patches per side) and the connector's pixel
   shuffle folds each ``scale_factor x scale_factor`` block of patches into one LM token, row-major
   (``Idefics3Connector.pixel_shuffle``): ``n = T / (patch * scale_factor)`` tokens per side, each a
   ``patch * scale_factor`` square of its view.

The prompt brackets the views with ``<fake_token_around_image>`` and names them with
``<row_r_col_c>`` / ``<global-img>``: those marker tokens are structural text tokens, not image
tokens; only the ``<image>`` positions are filled with features, in the order above (tiles
row-major, then the global view). Each token's box is its block of patches in its view, mapped
back through crop and both resizes to ORIGINAL image pixels.

SmolVLM shares the module tree (``model.vision_model`` / ``model.connector`` /
``model.text_model`` / ``lm_head``), the processor arithmetic and the prompt layout with
Idefics3. TransformerLens 4.3 registers only ``Idefics3ForConditionalGeneration``, so the SmolVLM
family builds its bridge with the Idefics3 adapter (``bridge_architecture``).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar

import numpy as np

from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.families.base import Family
from corelens.families.geometry import Affine, size_dict


def fit_to_tiles(w: int, h: int, tile: int) -> tuple[int, int]:
    """(w, h) after ``resize_for_vision_encoder``: both edges made multiples of ``tile``."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = int(w / aspect)
        h = math.ceil(h / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = int(h * aspect)
        w = math.ceil(w / tile) * tile
    return w, h


class Idefics3Like(Family):
    """What Idefics3 and SmolVLM share: splitting geometry and pixel shuffle."""

    resolution_settings = ("size", "max_image_size", "do_image_splitting")
    image_processing: ClassVar[str]  # HF module with the image processor's size arithmetic

    # --- processor arithmetic -----------------------------------------------------------------
    def _resized(self, ip: Any, size: tuple[int, int]) -> Affine:
        """original -> the image the splitting step sees (after the longest-edge resize)."""
        a = Affine.identity(size)
        if not getattr(ip, "do_resize", True):
            return a
        s = size_dict(ip.size)
        w, h = size
        if s.get("longest_edge"):
            hf = importlib.import_module(self.image_processing)
            nh, nw = hf.get_resize_output_image_size(np.zeros((1, h, w)),
                                                     resolution_max_side=s["longest_edge"])
        elif s.get("height") and s.get("width"):
            nh, nw = s["height"], s["width"]
        else:
            raise ValueError(f"{self.name}: unsupported image processor size {s}")
        return a.resize((int(nw), int(nh)))

    def views(self, hf_config: Any, processor: Any, size: tuple[int, int],
              ) -> list[tuple[str, Affine]]:
        """(name, original -> view pixels) of every view of an image, in feature order."""
        ip = processor.image_processor
        tile = int(size_dict(ip.max_image_size)["longest_edge"])
        vc = hf_config.vision_config
        where = f"{self.name}: image of size {size[0]}x{size[1]}"
        if tile != int(vc.image_size):
            raise ValueError(f"{where}: the processor makes {tile}-px views but the tower takes "
                             f"{vc.image_size} px; corelens does not understand this processor")
        a = self._resized(ip, size)
        if not getattr(ip, "do_image_splitting", True):
            return [("global", a.resize((tile, tile)))]
        a = a.resize(fit_to_tiles(*a.size, tile))
        w, h = a.size
        if w <= tile and h <= tile:
            return [("global", a)]
        out = []
        for r in range(h // tile):
            for c in range(w // tile):
                out.append((f"tile r{r + 1}c{c + 1}", a.crop(c * tile, r * tile, (tile, tile))))
        out.append(("global", a.resize((tile, tile))))
        return out

    # --- the layout ----------------------------------------------------------------------------
    def feature_rows(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        patch, scale = int(vc.patch_size), int(hf_config.scale_factor)
        side = int(vc.image_size) // patch  # patches per view side
        n = side // scale  # LM tokens per view side
        seq = int(getattr(processor, "image_seq_len", n * n))
        if seq != n * n:
            raise ValueError(f"{self.name}: the processor writes {seq} image tokens per view but "
                             f"the model merges {n}x{n} = {n * n}; their image_seq_len differs")
        pixels = inputs.get("pixel_values")
        if pixels is not None and tuple(pixels.shape[-2:]) != (vc.image_size, vc.image_size):
            raise ValueError(f"{self.name}: processed views are {tuple(pixels.shape[-2:])} (h, w) "
                             f"but the tower takes {vc.image_size} px; corelens does not "
                             "understand this processor")
        parts = []
        for name, a in self.views(hf_config, processor, size):
            s, o = a.inverse()
            cell = patch * scale
            parts.append(FeatureRows.grid(ViewGeometry.from_affine(name, n, n, (cell, cell), s, o,
                                                                   size)))
        return FeatureRows.concat(parts)

    def tower_grids(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        patch = int(vc.patch_size)
        side = int(vc.image_size) // patch
        out = []
        for name, a in self.views(hf_config, processor, size):
            s, o = a.inverse()
            out.append(ViewGeometry.from_affine(name, side, side, (patch, patch), s, o, size))
        return out

    def tower_merge(self, hf_config):
        return int(hf_config.scale_factor)


class Idefics3(Idefics3Like):
    name = "idefics3"
    hf_architectures = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)
    image_processing = "transformers.models.idefics3.image_processing_pil_idefics3"


class SmolVLM(Idefics3Like):
    name = "smolvlm"
    hf_architectures = ("SmolVLMForConditionalGeneration",)
    model_types = ("smolvlm",)
    image_processing = "transformers.models.smolvlm.image_processing_pil_smolvlm"

    def bridge_architecture(self, hf_config: Any) -> str:
        # TransformerLens 4.3 has no SmolVLM entry; its Idefics3 adapter maps the same module
        # paths (model.vision_model / model.connector / model.text_model / lm_head).
        return "Idefics3ForConditionalGeneration"
