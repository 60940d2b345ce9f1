"""InternVL (``InternVLForConditionalGeneration``: InternVL3 / InternVL3.5 as in transformers):
InternViT tower, pixel-shuffle + MLP projector, Qwen2 / Qwen3 (or Llama) decoder.

Geometry of one image (``GotOcr2ImageProcessor`` with ``crop_to_patches``, then
``InternVLModel.get_image_features``):

1. dynamic tiling: ``get_optimal_tiled_canvas`` picks the grid of ``cols x rows`` tiles (between
   ``min_patches`` and ``max_patches`` tiles) whose aspect ratio is closest to the image's; the
   image is squashed to ``cols * T x rows * T`` (``T`` = the processor's ``size``) and cut into
   tiles, row-major; when there is more than one tile, the whole image squashed to ``T x T`` is
   appended as the *thumbnail*. Without ``crop_to_patches`` (or ``max_patches <= 1``) the image is
   squashed to ``T x T`` alone;
2. the tower cuts ``T / patch`` patches per side, the CLS feature is dropped
   (``vision_feature_select_strategy="default"``), and the pixel shuffle (``downsample_ratio``
   0.5) folds each 2 x 2 block of patches into one LM token, row-major: ``n = T * ratio / patch``
   tokens per side, each a ``patch / ratio`` square of its tile.

The processor writes ``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``
per image: the delimiters are text tokens, only ``<IMG_CONTEXT>`` positions get features, in the
order above. Each token's box is its block of patches in its tile (or thumbnail), mapped back
through crop and resize to ORIGINAL image pixels.

TransformerLens 4.3 has no InternVL adapter: corelens adds one (``families/adapters.py``).
"""

from __future__ import annotations

from typing import Any

from corelens import compat
from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.families.base import Family
from corelens.families.geometry import Affine, size_dict

ARCHITECTURE = "InternVLForConditionalGeneration"


# --- the family -------------------------------------------------------------------------------
def _side(v: Any) -> int:
    """A config's image/patch size as one int (they may be ``[h, w]`` lists, square here)."""
    if isinstance(v, (list, tuple)):
        if len(set(int(x) for x in v)) != 1:
            raise ValueError(f"internvl: non-square size {v} is not supported")
        return int(v[0])
    return int(v)


class InternVL(Family):
    name = "internvl"
    resolution_settings = ("max_patches", "min_patches", "crop_to_patches")
    hf_architectures = (ARCHITECTURE,)
    model_types = ("internvl",)

    def bridge_architecture(self, hf_config: Any) -> str:
        return ARCHITECTURE  # corelens's adapter (families/adapters.py)

    # --- processor arithmetic -----------------------------------------------------------------
    @staticmethod
    def _image_kwargs(processor: Any) -> dict[str, Any]:
        """The image-processor settings the processor call really uses (its class defaults,
        e.g. ``crop_to_patches=True``, override the image processor's own attributes)."""
        ip = processor.image_processor
        out = {k: getattr(ip, k, None) for k in ("size", "crop_to_patches", "min_patches",
                                                   "max_patches", "do_resize")}
        merged = compat.processor_images_kwargs(processor) or {}
        out.update({k: v for k, v in merged.items() if k in out})
        return out

    def views(self, processor: Any, size: tuple[int, int]) -> list[tuple[str, Affine]]:
        """(name, original -> view pixels) of every tile of an image, in feature order."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        kw = self._image_kwargs(processor)
        s = size_dict(kw["size"])
        th, tw = int(s["height"]), int(s["width"])
        w, h = size
        a = Affine.identity(size)
        lo, hi = int(kw.get("min_patches") or 1), int(kw.get("max_patches") or 1)
        if not kw.get("crop_to_patches") or hi <= 1:
            return [("image", a.resize((tw, th)))]
        cols, rows = get_optimal_tiled_canvas((h, w), (th, tw), lo, hi)
        canvas = a.resize((tw * cols, th * rows))
        out = [(f"tile r{i // cols + 1}c{i % cols + 1}",
                canvas.crop((i % cols) * tw, (i // cols) * th, (tw, th)))
               for i in range(cols * rows)]
        if len(out) != 1:
            out.append(("thumbnail", a.resize((tw, th))))
        return out

    # --- the layout ----------------------------------------------------------------------------
    def image_token_string(self, processor: Any) -> str:
        return str(processor.image_token)

    def feature_rows(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        tile, patch = _side(vc.image_size), _side(vc.patch_size)
        ratio = float(hf_config.downsample_ratio)
        where = f"{self.name}: image {image} (size {size[0]}x{size[1]})"
        if hf_config.vision_feature_select_strategy != "default":
            raise ValueError(f"{where}: vision_feature_select_strategy="
                             f"{hf_config.vision_feature_select_strategy!r} keeps the CLS feature "
                             "and HF cannot pixel-shuffle it either")
        cell = round(patch / ratio)
        n = tile // cell  # LM tokens per tile side
        seq = int(getattr(processor, "image_seq_length", n * n))
        if seq != n * n:
            raise ValueError(f"{where}: the processor writes {seq} image tokens per tile but the "
                             f"model merges {n}x{n} = {n * n}; their image_seq_length differs")
        pixels = inputs.get("pixel_values")
        if pixels is not None and tuple(pixels.shape[-2:]) != (tile, tile):
            raise ValueError(f"{where}: processed tiles are {tuple(pixels.shape[-2:])} (h, w) but "
                             f"the tower takes {tile} px; corelens does not understand this "
                             "processor")
        parts = []
        for name, a in self.views(processor, size):
            if a.size != (tile, tile):
                raise ValueError(f"{where}: the processor makes {a.size} (w, h) tiles but the "
                                 f"tower takes {tile} px")
            s, o = a.inverse()
            parts.append(FeatureRows.grid(ViewGeometry.from_affine(name, n, n, (cell, cell), s, o,
                                                                   size)))
        return FeatureRows.concat(parts)

    def tower_grids(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        tile, patch = _side(vc.image_size), _side(vc.patch_size)
        out = []
        for name, a in self.views(processor, size):
            s, o = a.inverse()
            out.append(ViewGeometry.from_affine(name, tile // patch, tile // patch,
                                                (patch, patch), s, o, size))
        return out

    def tower_prefix(self, hf_config):
        return 1  # InternViT's CLS token (dropped before the pixel shuffle)

    def tower_merge(self, hf_config):
        return round(1 / float(hf_config.downsample_ratio))
