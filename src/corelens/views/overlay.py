"""Per-vision-token values painted on the ORIGINAL image through the VisionLayout boxes.

``heat_map`` turns (box, value) pairs into a per-pixel map: inside one view a pixel takes the
coverage-weighted mean of the tokens over it (boxes are fractional: a pixel on a token edge
blends its neighbours); across views (anyres tiles + base image, which overlap) ``combine="max"``
(default) keeps, per pixel, the view value of largest magnitude, ``"mean"`` averages the views
that cover the pixel. Pixels no token covers (cropped away / padding) stay unpainted (NaN).
Values are per token (an attention mass, a patching effect), not per pixel densities.
``paint`` blends a colormap over the image with opacity growing with the value's magnitude
(zero = the image untouched) and draws the evidence (green) and distractor (orange) boxes.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from corelens.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.layout import ImageLayout
from corelens.views.attention import Queries, query_patterns
from corelens.views.tokens import resolve_queries

Combine = Literal["max", "mean"]
Box = Sequence[float]
EVIDENCE_COLOR = (0, 230, 64)
DISTRACTOR_COLOR = (255, 140, 0)


def _coverage(lo: float, hi: float, n: int) -> tuple[int, np.ndarray]:
    """First pixel index and the covered fraction of each pixel of [lo, hi) on a 0..n axis."""
    i0, i1 = max(int(math.floor(lo)), 0), min(int(math.ceil(hi)), n)
    idx = np.arange(i0, i1, dtype=np.float64)
    return i0, np.clip(np.minimum(hi, idx + 1) - np.maximum(lo, idx), 0.0, 1.0)


def heat_map(size: tuple[int, int], boxes: Float[Tensor, "n 4"] | np.ndarray,
             values: Sequence[float] | Tensor | np.ndarray,
             views: Sequence[int] | Tensor | None = None, combine: Combine = "max") -> np.ndarray:
    """[height, width] float map (NaN where no token) of per-token ``values`` over ``boxes``
    (original pixels); ``views[i]`` names token i's view (all one view when None)."""
    if combine not in ("max", "mean"):
        raise InputError(f"combine must be 'max' or 'mean', not {combine!r}")
    w, h = size
    b = np.asarray(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4))
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64).flatten())
    if len(b) != len(v):
        raise InputError(f"{len(v)} values for {len(b)} token boxes")
    vid = np.zeros(len(v), dtype=np.int64) if views is None else np.asarray(
        torch.as_tensor(views).flatten())
    per_view = []
    for view in np.unique(vid):
        num, den = np.zeros((h, w)), np.zeros((h, w))
        for (x0, y0, x1, y1), val in zip(b[vid == view], v[vid == view]):
            if not (x1 > x0 and y1 > y0) or not np.isfinite(val):
                continue
            ix, cx = _coverage(x0, x1, w)
            iy, cy = _coverage(y0, y1, h)
            cov = np.outer(cy, cx)
            num[iy:iy + len(cy), ix:ix + len(cx)] += val * cov
            den[iy:iy + len(cy), ix:ix + len(cx)] += cov
        with np.errstate(invalid="ignore", divide="ignore"):
            per_view.append(np.where(den > 1e-9, num / den, np.nan))
    if not per_view:
        return np.full((h, w), np.nan)
    stack = np.stack(per_view)
    if combine == "mean":
        with np.errstate(invalid="ignore"):
            return np.nanmean(stack, axis=0) if len(stack) > 1 else stack[0]
    mag = np.where(np.isnan(stack), -np.inf, np.abs(stack))
    pick = np.take_along_axis(stack, mag.argmax(0)[None], 0)[0]
    return np.where(np.isinf(mag.max(0)), np.nan, pick)


def paint(
    image: Image.Image, heat: np.ndarray, *, cmap: str | None = None, alpha: float = 0.75,
    vmin: float | None = None, vmax: float | None = None, evidence: Sequence[Box] = (),
    distractors: Sequence[Box] = (), scale: int | None = None, min_side: int = 256,
) -> Image.Image:
    """Blend ``heat`` ([h, w], from ``heat_map``) over ``image``; draw the boxes.

    Non-negative values: ``inferno`` from ``vmin`` (default 0) to ``vmax`` (default the max).
    Signed values: ``RdBu_r`` symmetric about 0. Opacity = ``alpha`` x the value's normalised
    magnitude. The result is upscaled by ``scale`` (default: the integer factor that makes the
    longer side at least ``min_side``) with nearest-neighbour, so cells stay sharp.
    """
    import matplotlib

    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if heat.shape != base.shape[:2]:
        raise InputError(f"heat map {heat.shape} != image (height, width) {base.shape[:2]}")
    finite = heat[np.isfinite(heat)]
    signed = finite.size > 0 and finite.min() < 0 and vmin is None
    if signed:
        m = float(np.abs(finite).max()) if vmax is None else float(vmax)
        lo, hi = -m, m
        strength = np.abs(np.nan_to_num(heat)) / (m if m > 0 else 1.0)
    else:
        lo = 0.0 if vmin is None else float(vmin)
        hi = (float(finite.max()) if finite.size else 1.0) if vmax is None else float(vmax)
        strength = (np.nan_to_num(heat, nan=lo) - lo) / (hi - lo if hi > lo else 1.0)
    strength = np.clip(strength, 0.0, 1.0)
    norm = (np.nan_to_num(heat, nan=lo) - lo) / (hi - lo if hi > lo else 1.0)
    colors = matplotlib.colormaps[cmap or ("RdBu_r" if signed else "inferno")](
        np.clip(norm, 0, 1))[..., :3]
    a = (alpha * strength)[..., None]
    out = Image.fromarray(np.round((base * (1 - a) + colors * a) * 255).astype(np.uint8))
    w, h = out.size
    k = scale if scale is not None else max(1, math.ceil(min_side / max(w, h)))
    if k != 1:
        out = out.resize((w * k, h * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 120))
    for boxes, color in ((distractors, DISTRACTOR_COLOR), (evidence, EVIDENCE_COLOR)):
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0 * k, y0 * k, x1 * k - 1, y1 * k - 1], outline=color, width=width)
    return out


# --- from a batch ---------------------------------------------------------------------------
def _image_layout(batch: MultimodalBatch, example: int, image: int) -> ImageLayout:
    return batch.layout._image(example, image)


def _source_image(batch: MultimodalBatch, example: int, image: int,
                  override: Image.Image | None) -> Image.Image:
    if override is not None:
        return override
    if not batch.images or not batch.images[example]:
        raise InputError(f"example {example} carries no images: pass image_obj=")
    img = batch.images[example][image]
    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def _boxes_of(items: Sequence[tuple[int, Box]] | None, image: int) -> list[Box]:
    return [box for i, box in (items or []) if i == image]


def image_values(batch: MultimodalBatch, values: Tensor | Sequence[float], example: int = 0,
                 image: int = 0) -> Float[Tensor, " v"]:
    """The entries of ``values`` for image ``image``'s vision tokens, in layout order.

    ``values``: one per sequence position ([seq_len]), one per vision token of the example
    (``layout.vision_positions(example)`` order, e.g. ``patching.patch_vision_tokens``), or
    one per vision token of this image."""
    v = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    img = _image_layout(batch, example, image)
    if len(v) == batch.seq_len:
        return v[img.vision_positions.cpu()]
    all_pos = batch.layout.vision_positions(example).cpu()
    if len(v) == len(all_pos):
        where = {p: i for i, p in enumerate(all_pos.tolist())}
        return v[[where[p] for p in img.vision_positions.tolist()]]
    if len(v) == len(img.vision_positions):
        return v
    raise InputError(f"{len(v)} values: expected {batch.seq_len} (one per position), "
                     f"{len(all_pos)} (per vision token of example {example}) or "
                     f"{len(img.vision_positions)} (per vision token of image {image})")


def token_overlay(batch: MultimodalBatch, values: Tensor | Sequence[float], example: int = 0,
                  image: int = 0, *, combine: Combine = "max", image_obj: Image.Image | None = None,
                  draw_boxes: bool = True, **paint_kw: Any) -> Image.Image:
    """Any per-vision-token values (attention, patching effects...) painted on the image."""
    img = _image_layout(batch, example, image)
    vals = image_values(batch, values, example, image)
    source = _source_image(batch, example, image, image_obj)
    if source.size != tuple(img.size):
        raise InputError(f"image is {source.size}, the layout was built for {img.size}")
    view_ids = img.rows.view[img.vision_mask]
    heat = heat_map(img.size, img.boxes, vals, view_ids, combine)
    if draw_boxes:
        paint_kw.setdefault("evidence", _boxes_of(batch.boxes[example] if batch.boxes else None,
                                                  image))
        paint_kw.setdefault("distractors", _boxes_of(
            batch.distractors[example] if batch.distractors else None, image))
    return paint(source, heat, **paint_kw)


def _query_mass(rows: Tensor, head: int, reduce: str) -> Tensor:
    r = rows[head]  # [q, T]
    if reduce == "mean":
        return r.mean(0)
    if reduce == "max":
        return r.max(0).values
    raise InputError(f"reduce must be 'mean' or 'max' over query rows, not {reduce!r}")


def attention_overlay(
    model: Any, batch: MultimodalBatch, layer: int, head: int, example: int = 0,
    image: int = 0, query_positions: Queries = "query", *, reduce: str = "mean",
    combine: Combine = "max", cache: Any = None, **paint_kw: Any,
) -> Image.Image:
    """Head ``(layer, head)``'s attention from the query positions (mean over them) to each
    vision token of ``image``, painted on the original image with the evidence box drawn."""
    queries = resolve_queries(batch, example, query_positions)
    rows = query_patterns(model, batch, [layer], example, queries, cache)[layer]
    return token_overlay(batch, _query_mass(rows, head, reduce), example, image,
                         combine=combine, **paint_kw)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid(tiles: Sequence[Image.Image], titles: Sequence[str], cols: int = 4,
         cell: int = 224, pad: int = 6, title_h: int = 18) -> Image.Image:
    """Tiles (longer side scaled to ``cell``) in a grid, each with its title above."""
    if not tiles:
        raise InputError("no tiles to lay out")
    cols = max(1, min(cols, len(tiles)))
    fitted = []
    for tile in tiles:
        k = cell / max(tile.size)
        size = (max(1, round(tile.size[0] * k)), max(1, round(tile.size[1] * k)))
        fitted.append(tile.resize(size, Image.Resampling.NEAREST if k >= 1
                                  else Image.Resampling.LANCZOS))
    cw = max(t.size[0] for t in fitted)
    ch = max(t.size[1] for t in fitted)
    rows = math.ceil(len(tiles) / cols)
    out = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + title_h + pad) + pad),
                    "white")
    draw = ImageDraw.Draw(out)
    font = _font(12)
    for i, (tile, title) in enumerate(zip(fitted, titles)):
        r, c = divmod(i, cols)
        x, y = pad + c * (cw + pad), pad + r * (ch + title_h + pad)
        draw.text((x, y + 2), title, fill="black", font=font)
        out.paste(tile, (x, y + title_h))
    return out


@torch.no_grad()
def overlay_grid(
    model: Any, batch: MultimodalBatch, heads: Sequence[tuple[int, int]], example: int = 0,
    image: int = 0, query_positions: Queries = "query", *, cols: int = 4, cell: int = 224,
    reduce: str = "mean", combine: Combine = "max", shared_scale: bool = False,
    cache: Any = None, **paint_kw: Any,
) -> Image.Image:
    """``attention_overlay`` for each head (e.g. ``scores.top()``) in one grid, one forward.
    Each tile is titled ``L{layer}H{head}`` and the head's attention mass on the image;
    colours are per head unless ``shared_scale``."""
    heads = [(int(layer), int(h)) for layer, h in heads]
    queries = resolve_queries(batch, example, query_positions)
    layers = sorted({layer for layer, _ in heads})
    rows = query_patterns(model, batch, layers, example, queries, cache)
    masses = [image_values(batch, _query_mass(rows[layer], h, reduce), example, image)
              for layer, h in heads]
    if shared_scale:
        paint_kw.setdefault("vmax", max(float(m.max()) for m in masses))
    tiles = [token_overlay(batch, m, example, image, combine=combine, **paint_kw)
             for m in masses]
    titles = [f"L{layer}H{h}  mass {float(m.sum()):.2f}" for (layer, h), m in zip(heads, masses)]
    return grid(tiles, titles, cols=cols, cell=cell)
