"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, MLP projector,
Qwen2 decoder, "anyres" tiling.

Geometry of one image (what ``LlavaOnevisionModel.pack_image_features`` scatters, in order):

- patched (the image is alone in its sample, the case corelens's ``prepare`` produces):
  1. the *base* view: the whole image squashed to the tile size (no padding), a square grid of
     ``image_size // patch_size`` tokens per side, no newlines;
  2. the *anyres* view: the image resized to fit the best pinpoint resolution
     (``select_best_resolution`` / ``get_patch_output_size``), centred on a zero canvas of that
     resolution, cut into tiles of the tile size; the tiles' token grids are joined into one
     grid, the rows/cols that lie in the canvas padding are dropped (``unpad_image``, in token
     units), the grid is bilinearly shrunk when ``vision_aspect_ratio = anyres_max_N`` says it
     is too large (ratio > 1.1), and an ``image_newline`` row ends each grid row.
- not patched (an image of a multi-image sample: ``batch_num_images > 1``): the image padded
  to a square (centred), resized to the tile size, its grid, then ONE newline.

Videos (``pixel_values_videos``, ``[videos, frames, 3, H, W]``): every frame is resized (and
cropped) by the video processor to the tower's square like a multi-image image, encoded alone,
projected, and its ``side x side`` patch grid bilinearly pooled to ``ceil(side / 2)`` per side
(``apply_pooling``: with an even side that is exactly a 2 x 2 mean; with an odd side a token
stands for its proportional share of the grid, as the anyres shrink above); the frames' pooled
grids follow each other (frame-major, row-major inside a frame) and ONE ``image_newline`` ends
the video. So each video token sees exactly one frame. HF stacks the videos of a batch into one
tensor: they must all have the same number of frames (``check_videos`` says so up front).

Every token's box is mapped back through those steps to original-image pixels. A tile's
tokens need not cover the whole tile (27 SigLIP patches of 14 px see 378 of 384 px), so token
edges jump at tile borders. A downsampled token's box is the proportional share of the unpadded
grid it stands for (its sample point is the box centre; bilinear interpolation also mixes in up
to one neighbour per axis, and across a tile border it interpolates over the unseen strip).
``tests/test_onevision_layout.py`` checks all of it against HF's own ``pack_image_features``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from corelens.data.layout import KIND_NEWLINE, FeatureRows, ViewGeometry
from corelens.errors import InputError
from corelens.families.base import Family
from corelens.families.geometry import Affine, pad_to_square_offsets, resize_and_crop, size_dict
from corelens.families.llava import cls_tokens


def _token_edges(start: int, n_in: int, n_out: int, side: int, tile: int,
                 patch: int) -> tuple[Tensor, Tensor]:
    """Canvas pixel edges (along one axis) of ``n_out`` tokens sharing the ``n_in`` tokens of the
    joined tile grid that begin at token ``start`` (``n_out == n_in``: one token each).

    Token ``u`` of the joined grid is token ``u % side`` of tile ``u // side``: it starts at
    ``(u // side) * tile + (u % side) * patch``. A tile's tokens need not cover it (SigLIP at
    384 px with 14 px patches sees 27 * 14 = 378 px), so the map jumps at tile borders."""
    u = start + torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    t0 = torch.floor(u[:-1] / side)
    t1 = torch.ceil(u[1:] / side) - 1
    x0 = t0 * tile + (u[:-1] - t0 * side) * patch
    x1 = t1 * tile + (u[1:] - t1 * side) * patch
    return x0, x1


def _structural(n: int) -> FeatureRows:
    z = torch.full((n,), -1, dtype=torch.long)
    return FeatureRows(torch.full((n,), KIND_NEWLINE, dtype=torch.long), z, z.clone(), z.clone(),
                       [])


def _drop_first(rows: FeatureRows) -> FeatureRows:
    return FeatureRows(rows.kind[1:], rows.view[1:], rows.row[1:], rows.col[1:], rows.views)


def _view(name: str, rows: int, cols: int, cell: tuple[float, float], a: Affine,
          size: tuple[int, int], row_range: tuple[int, int] | None = None,
          col_range: tuple[int, int] | None = None) -> ViewGeometry:
    """A token grid over the processed pixels of ``a`` (original -> processed)."""
    scale, offset = a.inverse()
    return ViewGeometry.from_affine(name, rows, cols, cell, scale, offset, size,
                                    row_range=row_range, col_range=col_range)


class LlavaOnevision(Family):
    name = "llava_onevision"
    resolution_settings = ("image_grid_pinpoints",)
    config_settings = ("image_grid_pinpoints",)
    hf_architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"

    # --- processor arithmetic -----------------------------------------------------------------
    @staticmethod
    def _settings(ip: Any) -> tuple[tuple[int, int], int]:
        """(size_tuple (h, w) of the base resize, tile side in pixels), as ``_preprocess``."""
        size = size_dict(ip.size)
        crop = size_dict(getattr(ip, "crop_size", None))
        if size.get("height") and size.get("width"):
            size_tuple = (size["height"], size["width"])
        else:
            size_tuple = (size["shortest_edge"], size["shortest_edge"])
        if crop.get("height"):
            tile = crop["height"]
        elif size.get("height"):
            tile = size["height"]
        else:
            tile = size["shortest_edge"]
        return size_tuple, int(tile)

    @staticmethod
    def _tiled(inputs: dict[str, Tensor], n_images: int) -> list[bool]:
        """As HF: an image is tiled only when it is the sole image of its sample."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * n_images
        flags = [int(n) == 1 for n in torch.as_tensor(counts).flatten().tolist()
                 for _ in range(int(n))]
        return (flags + [True] * n_images)[:n_images]

    def _needs_patching(self, inputs: dict[str, Tensor], image: int) -> bool:
        return self._tiled(inputs, image + 1)[image]

    # --- the layout ----------------------------------------------------------------------------
    def layout_keys(self, inputs, sizes):
        # multi-image samples are not tiled
        return list(zip(sizes, self._tiled(inputs, len(sizes))))

    def feature_rows(self, hf_config, processor, inputs, image, size):
        hf = importlib.import_module(self.modeling)  # HF's own grid / unpad arithmetic
        get_anyres_image_grid_shape = hf.get_anyres_image_grid_shape
        image_size_to_num_patches = hf.image_size_to_num_patches
        unpad_image = hf.unpad_image

        where = f"{self.name}: image {image} (size {size[0]}x{size[1]})"
        ip = processor.image_processor
        vc = hf_config.vision_config
        w, h = size
        patch = int(vc.patch_size)
        side = int(vc.image_size) // patch  # tokens per tile side, as pack_image_features
        pixels = inputs.get("pixel_values")

        if "image_sizes" in inputs:
            got = tuple(int(v) for v in inputs["image_sizes"][image].tolist())
            if got != (h, w):
                raise ValueError(f"{where}: the processor recorded image_sizes {got} (h, w), "
                                 f"expected {(h, w)}; images and inputs do not match")
        if pixels is not None and tuple(pixels.shape[-2:]) != (vc.image_size, vc.image_size):
            raise ValueError(f"{where}: processed tiles are {tuple(pixels.shape[-2:])} (h, w) but "
                             f"the vision tower takes {vc.image_size} px; corelens does not "
                             "understand this processor")

        # what the tower keeps per tile: (CLS) + grid, minus the first row under "default"
        n_cls = cls_tokens(vc)
        drop_first = hf_config.vision_feature_select_strategy == "default"
        size_tuple, tile = self._settings(ip)

        if not self._needs_patching(inputs, image):
            left, top, m = pad_to_square_offsets(w, h)
            a = resize_and_crop(ip, Affine.identity(size).pad(left, top, (m, m)))
            self._check_tile(a, vc, where)
            rows = FeatureRows.grid(_view("image", side, side, (patch, patch), a, size))
            if n_cls:
                rows = FeatureRows.concat([_structural(n_cls), rows])
            if drop_first:
                rows = _drop_first(rows)
            self._check_tiles(pixels, image, 1, where)
            return FeatureRows.concat([rows, _structural(1)])

        if n_cls != int(drop_first):
            raise ValueError(f"{where}: vision_feature_select_strategy="
                             f"{hf_config.vision_feature_select_strategy!r} with a "
                             f"{vc.model_type} tower leaves {side * side + n_cls - drop_first} "
                             f"features per tile, not {side * side}; HF cannot tile this either")

        # base: the whole image squashed to size_tuple, then the per-patch resize / crop
        base = resize_and_crop(ip, Affine.identity(size).resize((size_tuple[1], size_tuple[0])))
        self._check_tile(base, vc, where)
        base_rows = FeatureRows.grid(_view("base", side, side, (patch, patch), base, size))

        # anyres canvas: resize to fit the best resolution, centre on it, cut into tiles
        pinpoints = hf_config.image_grid_pinpoints
        canvas = self._canvas(hf_config, ip, size, where)
        tile_after = resize_and_crop(ip, Affine.identity((tile, tile)))
        if tile_after.offset != (0.0, 0.0) or tile_after.size != (vc.image_size, vc.image_size):
            raise ValueError(f"{where}: each {tile} px tile is cropped or resized to "
                             f"{tile_after.size}; corelens supports tiles that reach the tower "
                             "whole")

        nph, npw = get_anyres_image_grid_shape([h, w], pinpoints, vc.image_size)
        n_tiles = image_size_to_num_patches([h, w], pinpoints, vc.image_size) - 1
        if n_tiles != nph * npw:
            raise ValueError(f"{where}: {n_tiles} tiles do not fill a {nph}x{npw} grid")
        self._check_tiles(pixels, image, 1 + n_tiles, where)

        # unpad in token units, with HF's own function on a grid of row / col indices
        gh, gw = nph * side, npw * side
        idx = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"))
        kept = unpad_image(idx, [h, w])
        r0, r1 = int(kept[0, 0, 0]), int(kept[0, -1, 0]) + 1
        c0, c1 = int(kept[1, 0, 0]), int(kept[1, 0, -1]) + 1
        ch, cw = r1 - r0, c1 - c0

        max_num_patches = self._max_num_patches(hf_config, processor, where)
        nh, nw = ch, cw
        if max_num_patches is not None:
            ratio = math.sqrt(ch * cw / (max_num_patches * side ** 2))
            if ratio > 1.1:  # bilinear shrink: token (i, j) stands for its share of the grid
                nh, nw = int(ch // ratio), int(cw // ratio)
        (sx, sy), (ox, oy) = canvas.inverse()
        xs0, xs1 = _token_edges(c0, cw, nw, side, tile, patch)
        ys0, ys1 = _token_edges(r0, ch, nh, side, tile, patch)
        boxes = torch.empty(nh, nw, 4, dtype=torch.float64)
        boxes[..., 0] = (xs0 * sx + ox).clamp(0, w).view(1, nw)
        boxes[..., 2] = (xs1 * sx + ox).clamp(0, w).view(1, nw)
        boxes[..., 1] = (ys0 * sy + oy).clamp(0, h).view(nh, 1)
        boxes[..., 3] = (ys1 * sy + oy).clamp(0, h).view(nh, 1)
        view = ViewGeometry("anyres", nh, nw, boxes.float())
        return FeatureRows.concat([base_rows, FeatureRows.grid(view, newline_after_row=True)])

    @staticmethod
    def _canvas(hf_config: Any, ip: Any, size: tuple[int, int], where: str) -> Affine:
        """original -> the anyres canvas (the image resized to fit the best pinpoint
        resolution, centred on it), checked against the model's pinpoints and tile size."""
        from transformers.image_processing_utils import (
            get_patch_output_size,
            select_best_resolution,
        )
        from transformers.image_utils import ChannelDimension

        w, h = size
        vc = hf_config.vision_config
        tile = LlavaOnevision._settings(ip)[1]
        pinpoints = hf_config.image_grid_pinpoints
        bh, bw = select_best_resolution([h, w], ip.image_grid_pinpoints)
        if [bh, bw] != list(select_best_resolution([h, w], pinpoints)):
            raise ValueError(f"{where}: the processor and the model pick different pinpoints "
                             f"({(bh, bw)} vs {select_best_resolution([h, w], pinpoints)}); "
                             "their image_grid_pinpoints differ")
        if tile != vc.image_size or bh % tile or bw % tile:
            raise ValueError(f"{where}: tiles of {tile} px over a {bw}x{bh} canvas do not match "
                             f"the model's {vc.image_size} px tiles; HF would mis-split them")
        new_h, new_w = get_patch_output_size(np.zeros((1, h, w)), (bh, bw),
                                             input_data_format=ChannelDimension.FIRST)
        paste_x, paste_y = (bw - new_w) // 2, (bh - new_h) // 2  # _get_padding_size
        return Affine.identity(size).resize((new_w, new_h)).pad(paste_x, paste_y, (bw, bh))

    def tower_grids(self, hf_config, processor, inputs, image, size):
        ip = processor.image_processor
        vc = hf_config.vision_config
        patch = int(vc.patch_size)
        side = int(vc.image_size) // patch
        grid = (patch, patch)
        where = f"{self.name}: image {image} (size {size[0]}x{size[1]})"
        if not self._needs_patching(inputs, image):
            left, top, m = pad_to_square_offsets(*size)
            a = resize_and_crop(ip, Affine.identity(size).pad(left, top, (m, m)))
            return [_view("image", side, side, grid, a, size)]
        size_tuple, tile = self._settings(ip)
        base = resize_and_crop(ip, Affine.identity(size).resize((size_tuple[1], size_tuple[0])))
        canvas = self._canvas(hf_config, ip, size, where)
        cols, rows = canvas.size[0] // tile, canvas.size[1] // tile
        return [_view("base", side, side, grid, base, size)] + [
            _view(f"tile r{i + 1}c{j + 1}", side, side, grid,
                  canvas.crop(j * tile, i * tile, (tile, tile)), size)
            for i in range(rows) for j in range(cols)]

    def tower_prefix(self, hf_config):
        return cls_tokens(hf_config.vision_config)

    @staticmethod
    def _max_num_patches(hf_config: Any, processor: Any, where: str) -> int | None:
        """N of ``vision_aspect_ratio = anyres_max_N`` (None: the grid is never shrunk)."""
        aspect = getattr(hf_config, "vision_aspect_ratio", "anyres_max_9")
        proc_aspect = getattr(processor, "vision_aspect_ratio", aspect)
        if proc_aspect != aspect:
            raise ValueError(f"{where}: the processor counts tokens with vision_aspect_ratio="
                             f"{proc_aspect!r} but the model packs them with {aspect!r}")
        return int(aspect.strip("anyres_max_"))

    @staticmethod
    def _check_tile(a: Affine, vc: Any, where: str) -> None:
        if a.size != (vc.image_size, vc.image_size):
            raise ValueError(f"{where}: the processor settings make {a.size} (w, h) tiles but "
                             f"the tower takes {vc.image_size} px; corelens does not understand "
                             "this processor")

    @staticmethod
    def _check_tiles(pixels: Tensor | None, image: int, n: int, where: str) -> None:
        """The processor stacked ``n`` tiles for this image (the rest is batch padding)."""
        if pixels is None or pixels.ndim != 5:
            return
        have = pixels.shape[1]
        if n > have or (n < have and bool(pixels[image, n:].ne(0).any())):
            real = have
            while real > 0 and not bool(pixels[image, real - 1].ne(0).any()):
                real -= 1
            raise ValueError(f"{where}: the processor made {real} tile(s) (base included) but "
                             f"corelens's geometry predicts {n}; corelens does not understand "
                             "this processor's tiling")

    # --- videos ------------------------------------------------------------------------------
    supports_video = True

    def check_videos(self, lengths: list[int]) -> None:
        if len(set(lengths)) > 1:
            raise InputError(f"{self.name}: HF stacks a batch's videos into one tensor, so every "
                             f"video of a batch needs the same number of frames; got {lengths} "
                             "(sample the same number of frames, or batch them apart)")

    def video_feature_rows(self, hf_config, processor, inputs, video, size, n_frames, times):
        where = f"{self.name}: video {video} (frames {size[0]}x{size[1]})"
        vc = hf_config.vision_config
        patch = int(vc.patch_size)
        side = int(vc.image_size) // patch
        n_cls = cls_tokens(vc)
        if n_cls != int(hf_config.vision_feature_select_strategy == "default"):
            raise ValueError(f"{where}: vision_feature_select_strategy="
                             f"{hf_config.vision_feature_select_strategy!r} with a "
                             f"{vc.model_type} tower does not leave a square patch grid; HF "
                             "cannot pool these video frames either")
        a = resize_and_crop(processor.video_processor, Affine.identity(size))
        self._check_tile(a, vc, where)
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None and (pixels.ndim != 5 or pixels.shape[1] != n_frames):
            raise ValueError(f"{where}: pixel_values_videos has shape {tuple(pixels.shape)}, "
                             f"expected [videos, {n_frames}, 3, H, W]")
        n = math.ceil(side / 2)  # apply_pooling: bilinear to ceil(side / 2) per side
        cell = side * patch / n
        grid = _view("frame", n, n, (cell, cell), a, size)
        rows = [FeatureRows.grid(grid.at_frames(f"f{f}", (f, f + 1), times))
                for f in range(n_frames)]
        return FeatureRows.concat(rows + [_structural(1)])
