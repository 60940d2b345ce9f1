"""Pixel geometry of HF image processors: where a processed pixel came from in the original.

Each step (pad, resize, crop) is an affine map per axis; composing them gives the map from a
processed pixel to an original one. The functions mirror HF's own size arithmetic (and call it
where it is public), so token boxes land exactly where the processor put the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Affine:
    """processed = original * scale + offset, per axis (x, y). ``size`` = processed (w, h)."""

    scale: tuple[float, float]
    offset: tuple[float, float]
    size: tuple[int, int]

    @classmethod
    def identity(cls, size: tuple[int, int]) -> "Affine":
        return cls((1.0, 1.0), (0.0, 0.0), size)

    def then(self, scale: tuple[float, float], offset: tuple[float, float],
             size: tuple[int, int]) -> "Affine":
        sx, sy = self.scale
        ox, oy = self.offset
        return Affine((sx * scale[0], sy * scale[1]),
                      (ox * scale[0] + offset[0], oy * scale[1] + offset[1]), size)

    def resize(self, size: tuple[int, int]) -> "Affine":
        w, h = self.size
        return self.then((size[0] / w, size[1] / h), (0.0, 0.0), size)

    def pad(self, left: int, top: int, size: tuple[int, int]) -> "Affine":
        return self.then((1.0, 1.0), (float(left), float(top)), size)

    def crop(self, left: int, top: int, size: tuple[int, int]) -> "Affine":
        return self.then((1.0, 1.0), (-float(left), -float(top)), size)

    def inverse(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, offset) of the map processed -> original."""
        sx, sy = self.scale
        ox, oy = self.offset
        return (1 / sx, 1 / sy), (-ox / sx, -oy / sy)


def size_dict(d: Any) -> dict[str, int]:
    if d is None:
        return {}
    if hasattr(d, "items"):
        return {k: v for k, v in d.items() if v is not None}
    return {k: getattr(d, k) for k in ("height", "width", "shortest_edge", "longest_edge")
            if getattr(d, k, None) is not None}


def resize_output_size(w: int, h: int, size: Any) -> tuple[int, int]:
    """The (w, h) an HF backend's ``resize`` produces for a size dict (both backends agree)."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    s = size_dict(size)
    if "shortest_edge" in s and "longest_edge" in s:
        from transformers.image_processing_backends import get_size_with_aspect_ratio

        nh, nw = get_size_with_aspect_ratio((h, w), s["shortest_edge"], s["longest_edge"])
        return int(nw), int(nh)
    if "shortest_edge" in s:
        dummy = np.zeros((1, h, w))
        nh, nw = get_resize_output_image_size(dummy, size=s["shortest_edge"],
                                              default_to_square=False,
                                              input_data_format=ChannelDimension.FIRST)
        return int(nw), int(nh)
    if "height" in s and "width" in s:
        return int(s["width"]), int(s["height"])
    raise ValueError(f"unsupported resize size {s}")


def center_crop_offsets(w: int, h: int, cw: int, ch: int) -> tuple[int, int, int, int]:
    """(pad_left, pad_top, crop_left, crop_top) of HF's center crop (pads first if too small)."""
    pad_left = (cw - w) // 2 if cw > w else 0
    pad_top = (ch - h) // 2 if ch > h else 0
    w2, h2 = max(w, cw), max(h, ch)
    return pad_left, pad_top, int((w2 - cw) / 2.0), int((h2 - ch) / 2.0)


def pad_to_square_offsets(w: int, h: int) -> tuple[int, int, int]:
    """(left, top, side) of LLaVA's ``pad_to_square`` (image centred on a square canvas)."""
    m = max(w, h)
    return (m - w) // 2, (m - h) // 2, m


def resize_and_crop(ip: Any, a: Affine) -> Affine:
    """Follow ``a`` with an HF image processor's resize (to ``ip.size``) and centre crop."""
    if getattr(ip, "do_resize", True):
        a = a.resize(resize_output_size(*a.size, ip.size))
    if getattr(ip, "do_center_crop", False):
        crop = size_dict(ip.crop_size)
        cw, ch = crop["width"], crop["height"]
        pl, pt, cl, ct = center_crop_offsets(*a.size, cw, ch)
        a = a.pad(pl, pt, (max(a.size[0], cw), max(a.size[1], ch))).crop(cl, ct, (cw, ch))
    return a
