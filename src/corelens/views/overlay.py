"""Per-vision-token values painted on the ORIGINAL image through the VisionLayout boxes.

``heat_map`` turns (box, value) pairs into a per-pixel map: inside one view a pixel takes the
coverage-weighted mean of the tokens over it (boxes are fractional: a pixel on a token edge
blends its neighbours); across views (anyres tiles + base image, which overlap) ``combine="max"``
(default) keeps, per pixel, the view value of largest magnitude, ``"mean"`` averages the views
that cover the pixel. Pixels no token covers (cropped away / padding) stay unpainted (NaN).
Values are per token (an attention mass, a patching effect), not per pixel densities.
``paint`` blends a colormap over the image with opacity growing with the value's magnitude
(zero = the image untouched) and draws the evidence (green) and distractor (orange) boxes.

Videos: ``video_overlays`` paints a video's per-token values frame span by frame span (a
token sees the frames ``[a, b)`` of its span: one frame for LLaVA-OneVision, two for Qwen-VL's
temporal patch), one tile per span (on the span's first frame) or per frame, on one colour
scale for the whole video so tiles compare across time; the evidence boxes of the frames a tile
shows are drawn on it. ``token_overlay`` / ``attention_overlay`` / ``overlay_grid`` take
``video=v`` and lay those tiles out in a strip (one row per head in ``overlay_grid``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from corelens.data.batch import MultimodalBatch
from corelens.data.layout import ImageLayout, span_label
from corelens.errors import InputError
from corelens.heads import head_name
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
    signed: bool | None = None,
) -> Image.Image:
    """Blend ``heat`` ([h, w], from ``heat_map``) over ``image``; draw the boxes.

    Non-negative values: ``inferno`` from ``vmin`` (default 0) to ``vmax`` (default the max).
    Signed values: ``RdBu_r`` symmetric about 0 (``signed``: force either scale; default:
    signed when a value is negative and no ``vmin`` is given). Opacity = ``alpha`` x the
    value's normalised magnitude. The result is upscaled by ``scale`` (default: the integer
    factor that makes the longer side at least ``min_side``) with nearest-neighbour, so cells
    stay sharp.
    """
    import matplotlib

    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if heat.shape != base.shape[:2]:
        raise InputError(f"heat map {heat.shape} != image (height, width) {base.shape[:2]}")
    finite = heat[np.isfinite(heat)]
    if signed is None:
        signed = finite.size > 0 and finite.min() < 0 and vmin is None
    if signed:
        m = (float(np.abs(finite).max()) if finite.size else 1.0) if vmax is None else float(vmax)
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


def _which_video(batch: MultimodalBatch, example: int, video: int | None) -> int | None:
    """``video``, or 0 for an example that has videos and no image (it has nothing else to show)."""
    if video is not None:
        return video
    entries = batch.layout.images[example]
    return 0 if entries and all(im.is_video for im in entries) else None


def _entry(batch: MultimodalBatch, example: int, image: int, video: int | None) -> ImageLayout:
    return _image_layout(batch, example, image) if video is None else batch.layout.video(
        example, video)


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
                 image: int = 0, *, video: int | None = None) -> Float[Tensor, " v"]:
    """The entries of ``values`` for image ``image``'s (or video ``video``'s) vision tokens, in
    layout order.

    ``values``: one per sequence position ([seq_len]), one per vision token of the example
    (``layout.vision_positions(example)`` order, e.g. ``patching.patch_vision_tokens``), or
    one per vision token of this image / video."""
    v = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    img = _entry(batch, example, image, video)
    what = f"image {image}" if video is None else f"video {video}"
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
                     f"{len(img.vision_positions)} (per vision token of {what})")


def token_overlay(batch: MultimodalBatch, values: Tensor | Sequence[float], example: int = 0,
                  image: int = 0, *, combine: Combine = "max", image_obj: Image.Image | None = None,
                  draw_boxes: bool = True, video: int | None = None, cols: int | None = None,
                  cell: int = 224, **paint_kw: Any) -> Image.Image:
    """Any per-vision-token values (attention, patching effects...) painted on the image.

    ``video=v``: on the frames of video v instead, a strip of ``video_overlays`` tiles
    (``cols`` per row, default all in one row; each tile's longer side ``cell`` px); ``frames``,
    ``per``, ``shared_scale`` and ``frames_obj`` go to ``video_overlays``. An example with
    videos and no image paints its video 0 by default."""
    video = _which_video(batch, example, video)
    if video is not None:
        tiles = video_overlays(batch, values, example, video, combine=combine,
                               draw_boxes=draw_boxes, **paint_kw)
        return grid([t for _, t in tiles], [title for title, _ in tiles],
                    cols=cols or len(tiles), cell=cell)
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


def _video_boxes(items: Sequence[Any] | None, video: int, frames: tuple[int, int]) -> list[Box]:
    """Boxes of the video evidence entries (frame ranges, tracks) of ``video`` in ``frames``."""
    out: list[Box] = []
    for ev in items or []:
        if getattr(ev, "video", None) != video:
            continue
        for (a, b), box in ev.parts():
            if a < frames[1] and b > frames[0]:
                out.append(box)
    return out


def video_overlays(
    batch: MultimodalBatch, values: Tensor | Sequence[float], example: int = 0, video: int = 0,
    *, frames: tuple[int, int] | None = None, per: Literal["span", "frame"] = "span",
    combine: Combine = "max", frames_obj: Sequence[Image.Image] | None = None,
    draw_boxes: bool = True, shared_scale: bool = True, **paint_kw: Any,
) -> list[tuple[str, Image.Image]]:
    """Per-vision-token ``values`` of video ``video`` painted on its frames: ``(title, tile)``
    per frame span in time order (only the spans that see a frame of ``frames = (start, end)``
    when given, end exclusive).

    ``per="span"``: one tile per span of frames the tokens see, painted on the span's first
    frame; ``per="frame"``: one tile per frame, each painted with its span's tokens (for Qwen's
    2-frame spans both frames show the same values). Titles name the frames, their seconds when
    the fps is known (``f2-3,1-1.5s``) and the sum of the tile's values. ``shared_scale``: one
    colour scale (and one signed / unsigned choice) for every tile; ``values`` as in
    ``image_values``; ``frames_obj``: frames to paint on instead of the batch's own.
    """
    if per not in ("span", "frame"):
        raise InputError(f"per must be 'span' or 'frame', not {per!r}")
    lay = batch.layout.video(example, video)
    vals = image_values(batch, values, example, video=video)
    if frames_obj is None:
        if not batch.videos or len(batch.videos[example]) <= video:
            raise InputError(f"example {example} carries no video {video}: pass frames_obj=")
        frames_obj = batch.videos[example][video].frames
    if len(frames_obj) != lay.n_frames or any(f.size != tuple(lay.size) for f in frames_obj):
        got = f"{len(frames_obj)} frame(s) of size {frames_obj[0].size if frames_obj else None}"
        raise InputError(f"{got}: the layout was built for {lay.n_frames} frame(s) of "
                         f"{tuple(lay.size)}")
    if frames is not None and not 0 <= frames[0] < frames[1] <= lay.n_frames:
        raise InputError(f"frames={tuple(frames)} lies outside the video's {lay.n_frames} "
                         "frame(s) (0-based, end exclusive)")
    view_of = lay.rows.view[lay.vision_mask]
    spans: dict[tuple[int, int], list[int]] = {}  # frames -> views that see them
    for v, geom in enumerate(lay.views):
        spans.setdefault(geom.frames or (0, lay.n_frames), []).append(v)
    order = sorted(s for s in spans if frames is None or (s[0] < frames[1] and s[1] > frames[0]))
    sel = {s: torch.isin(view_of, torch.tensor(spans[s])) for s in order}
    shown = torch.cat([vals[sel[s]] for s in order]) if order else vals[:0]
    finite = shown[torch.isfinite(shown)]
    if shared_scale and finite.numel():
        signed = bool(finite.min() < 0) and paint_kw.get("vmin") is None
        paint_kw.setdefault("signed", signed)
        paint_kw.setdefault("vmax", float(finite.abs().max() if signed else finite.max()))
    stamps = batch.videos[example][video].timestamps if batch.videos and len(
        batch.videos[example]) > video else None
    out = []
    for a, b in order:
        keep = sel[(a, b)]
        heat = heat_map(lay.size, lay.boxes[keep], vals[keep], view_of[keep], combine)
        times = lay.views[spans[(a, b)][0]].times
        total = f"sum {float(vals[keep].nansum()):.3g}"
        shown_frames = [(a, b)] if per == "span" else [(f, f + 1) for f in range(a, b)]
        for fa, fb in shown_frames:
            kw = dict(paint_kw)
            if draw_boxes:
                kw.setdefault("evidence", _video_boxes(batch.boxes[example] if batch.boxes
                                                       else None, video, (fa, fb)))
                kw.setdefault("distractors", _video_boxes(
                    batch.distractors[example] if batch.distractors else None, video, (fa, fb)))
            if per == "span":
                title = span_label((a, b), times)
            else:
                t = None if stamps is None else (stamps[fa], stamps[fa])
                title = span_label((fa, fb), t)
            out.append((f"{title}  {total}", paint(frames_obj[fa], heat, **kw)))
    return out


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
    combine: Combine = "max", cache: Any = None, video: int | None = None, **paint_kw: Any,
) -> Image.Image:
    """Head ``(layer, head)``'s attention from the query positions (mean over them) to each
    vision token of ``image``, painted on the original image with the evidence box drawn
    (``video=v``: on the frames of video v, a strip of frame-span tiles; see
    ``token_overlay``)."""
    queries = resolve_queries(batch, example, query_positions)
    rows = query_patterns(model, batch, [layer], example, queries, cache)[layer]
    return token_overlay(batch, _query_mass(rows, head, reduce), example, image,
                         combine=combine, video=video, **paint_kw)


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
    cache: Any = None, video: int | None = None, **paint_kw: Any,
) -> Image.Image:
    """``attention_overlay`` for each head (e.g. ``scores.top()``) in one grid, one forward.
    Each tile is titled ``L{layer}H{head}`` and the head's attention mass on the image;
    colours are per head unless ``shared_scale``. ``video=v``: one row per head, one tile per
    frame span of video v (``video_overlays``; one colour scale per row, or for all rows with
    ``shared_scale``; the default for an example with videos and no image)."""
    video = _which_video(batch, example, video)
    heads = [(int(layer), int(h)) for layer, h in heads]
    queries = resolve_queries(batch, example, query_positions)
    layers = sorted({layer for layer, _ in heads})
    rows = query_patterns(model, batch, layers, example, queries, cache)
    masses = [image_values(batch, _query_mass(rows[layer], h, reduce), example, image,
                           video=video) for layer, h in heads]
    if shared_scale:
        paint_kw.setdefault("vmax", max(float(m.max()) for m in masses))
    if video is not None:
        tiles, titles = [], []
        for (layer, h), m in zip(heads, masses):
            for title, tile in video_overlays(batch, m, example, video, combine=combine,
                                              **paint_kw):
                tiles.append(tile)
                titles.append(f"{head_name((layer, h))} {title}")
        return grid(tiles, titles, cols=len(tiles) // len(heads), cell=cell)
    tiles = [token_overlay(batch, m, example, image, combine=combine, **paint_kw)
             for m in masses]
    titles = [f"{head_name(head)}  mass {float(m.sum()):.2f}" for head, m in zip(heads, masses)]
    return grid(tiles, titles, cols=cols, cell=cell)
