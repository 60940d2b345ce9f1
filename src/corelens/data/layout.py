"""Where every vision token sits: in the sequence, in its view's token grid, and in the image.

A family (``corelens.families``) describes each image (or video) as an ordered list of
*feature rows*: the rows the model scatters into the image-token (video-token) positions of
``input_ids``, in order. Most rows are vision tokens (a cell of some view's token grid, with a
box in ORIGINAL image pixels); some are structural (LLaVA-OneVision's newline after each grid
row) and are not part of the visual set V_e.
``VisionLayout`` pairs those rows with the sequence positions they fill.

Boxes are ``(x0, y0, x1, y1)`` in original-image pixels, x1/y1 exclusive, float (resizing makes
token edges fractional). A token whose cell lies wholly in padding has an empty box.

Videos: a video is laid out like an image whose views are frame spans. Each ``ViewGeometry`` of
a video carries ``frames = (start, end)`` (the given frames its tokens see, end exclusive: one
frame for LLaVA-OneVision, two for Qwen-VL's temporal patch of 2) and, when the video's fps is
known, ``times = (t_first, t_last)``: the seconds at which the first and the last of those frames
were shown. A video's boxes are in original FRAME pixels. ``VisionLayout.images[e]`` lists an
example's images first (``images[e][i]`` is image i, as before) and then its videos
(``ImageLayout.modality == "video"``; ``VisionLayout.video(e, v)`` finds video v).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from corelens.errors import LayoutError

KIND_VISION = 0
KIND_NEWLINE = 1


@dataclass
class ViewGeometry:
    """One view of an image (the whole image, an anyres tile set, a base thumbnail, a frame).

    ``rows x cols`` is the view's token grid; ``boxes[r, c]`` the box of that token in the
    original image (``boxes``: ``Float[Tensor, "rows cols 4"]``, x0, y0, x1, y1 in pixels).

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 1, seed=0))
        view = batch.layout.image(0, 0).views[0]
        view.name, view.rows, view.cols  # ('image', 8, 8)
        view.boxes[0, 0]  # tensor([0., 0., 8., 8.]): the top-left token's box
        ```
    """

    name: str
    rows: int
    cols: int
    boxes: Float[Tensor, "rows cols 4"]
    frames: tuple[int, int] | None = None  # video frames [start, end) these tokens see
    times: tuple[float, float] | None = None  # seconds of the first and last of those frames

    def at_frames(self, name: str, frames: tuple[int, int],
                  times: Sequence[float] | None = None) -> "ViewGeometry":
        """This grid as the view of frames ``[start, end)`` of a video (``times``: the seconds of
        every frame of the video, or None)."""
        t = None if times is None else (float(times[frames[0]]), float(times[frames[1] - 1]))
        return ViewGeometry(name, self.rows, self.cols, self.boxes, frames, t)

    @classmethod
    def from_affine(
        cls,
        name: str,
        rows: int,
        cols: int,
        cell: tuple[float, float],
        scale: tuple[float, float],
        offset: tuple[float, float],
        image_size: tuple[int, int],
        row_range: tuple[int, int] | None = None,
        col_range: tuple[int, int] | None = None,
    ) -> "ViewGeometry":
        """A grid of ``cell = (cell_w, cell_h)`` processed pixels per token, where processed pixel
        ``p`` maps to original pixel ``p * scale + offset`` (per axis, x then y); boxes clipped
        to the image. ``row_range``/``col_range`` select a sub-grid (e.g. after unpadding)."""
        r0, r1 = row_range or (0, rows)
        c0, c1 = col_range or (0, cols)
        boxes = _affine_boxes(int(r0), int(r1), int(c0), int(c1),
                              *(float(v) for v in (*cell, *scale, *offset)),
                              float(image_size[0]), float(image_size[1]))
        return cls(name=name, rows=r1 - r0, cols=c1 - c0, boxes=boxes)


# Layouts repeat: every image of one size has the same token boxes and grid indices, batch after
# batch. The two pure functions below are memoised; what they return is shared (as rows of equal
# images within one batch always were) and never modified in place.
@functools.lru_cache(maxsize=4096)
def _affine_boxes(r0: int, r1: int, c0: int, c1: int, cw: float, ch: float, sx: float,
                  sy: float, ox: float, oy: float, w: float, h: float) -> Tensor:
    """``ViewGeometry.from_affine``'s boxes (float32 ``[rows, cols, 4]``)."""
    xs = torch.arange(c0, c1 + 1, dtype=torch.float64) * cw * sx + ox
    ys = torch.arange(r0, r1 + 1, dtype=torch.float64) * ch * sy + oy
    xs, ys = xs.clamp(0, w), ys.clamp(0, h)
    nr, nc = r1 - r0, c1 - c0
    boxes = torch.empty(nr, nc, 4, dtype=torch.float64)
    boxes[..., 0] = xs[:-1].view(1, nc)
    boxes[..., 2] = xs[1:].view(1, nc)
    boxes[..., 1] = ys[:-1].view(nr, 1)
    boxes[..., 3] = ys[1:].view(nr, 1)
    return boxes.float()


@functools.lru_cache(maxsize=4096)
def _grid_indices(rows: int, cols: int, newline_after_row: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``FeatureRows.grid``'s (kind, view, row, col)."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    kind = torch.zeros(rows * cols, dtype=torch.long)
    if newline_after_row:
        per_row = cols + 1
        r = torch.arange(rows).repeat_interleave(per_row)
        c = torch.arange(per_row).repeat(rows)
        kind = (c == cols).long()
        c = torch.where(kind == 1, -1, c)
    vidx = torch.where(kind == KIND_VISION, 0, -1)
    return kind, vidx, r, c


@dataclass
class FeatureRows:
    """The rows a family's model merges into one image's placeholder tokens, in order."""

    kind: Int[Tensor, " n"]  # KIND_VISION or KIND_NEWLINE
    view: Int[Tensor, " n"]  # index into ``views`` (-1 for structural rows)
    row: Int[Tensor, " n"]
    col: Int[Tensor, " n"]
    views: list[ViewGeometry]

    def __len__(self) -> int:
        return int(self.kind.numel())

    @classmethod
    def concat(cls, parts: Sequence["FeatureRows"]) -> "FeatureRows":
        views: list[ViewGeometry] = []
        kind, view, row, col = [], [], [], []
        for p in parts:
            kind.append(p.kind)
            view.append(torch.where(p.view >= 0, p.view + len(views), p.view))
            row.append(p.row)
            col.append(p.col)
            views.extend(p.views)
        return cls(torch.cat(kind), torch.cat(view), torch.cat(row), torch.cat(col), views)

    @classmethod
    def grid(cls, view: ViewGeometry, newline_after_row: bool = False) -> "FeatureRows":
        """Row-major tokens of one view, optionally with a newline row after each grid row."""
        kind, vidx, r, c = _grid_indices(int(view.rows), int(view.cols), bool(newline_after_row))
        return cls(kind, vidx, r, c, [view])

    def boxes(self) -> Float[Tensor, "n 4"]:
        out = torch.zeros(len(self), 4)
        for v, geom in enumerate(self.views):
            sel = self.view == v
            out[sel] = geom.boxes[self.row[sel], self.col[sel]]
        return out


@dataclass
class ImageLayout:
    """One image of one example: its original size and where its tokens went.

    ``positions``: ``Int[Tensor, "n"]``, every feature row of the image (delimiters and
    newline rows included); ``vision_positions``: ``Int[Tensor, "v"]``, its image-feature
    tokens, with their boxes in ``boxes``, ``Float[Tensor, "v 4"]`` (original pixels). For a
    video, ``frame_ranges`` / ``time_ranges`` give the frames and seconds each token spans.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 1, seed=0))
        img = batch.layout.image(0, 0)  # example 0, image 0
        img.size  # (64, 64): the original (width, height)
        img.vision_positions.shape, img.boxes.shape  # ([64], [64, 4])
        ```
    """

    image_index: int  # index of the image (or video) within its example's images (videos)
    size: tuple[int, int]  # original (width, height) of the image / of every frame
    positions: Int[Tensor, " n"]  # sequence positions of all its feature rows (incl. newlines)
    rows: FeatureRows
    modality: str = "image"  # "image" | "video"
    n_frames: int = 1  # frames of a video (1 for an image)

    @property
    def is_video(self) -> bool:
        return self.modality == "video"

    @property
    def vision_mask(self) -> Bool[Tensor, " n"]:
        return self.rows.kind == KIND_VISION

    @property
    def vision_positions(self) -> Int[Tensor, " v"]:
        """Positions of the image-feature tokens (V_e for this image), delimiters excluded."""
        return self.positions[self.vision_mask]

    @property
    def boxes(self) -> Float[Tensor, "v 4"]:
        """Box of each vision token in ``vision_positions`` order, original pixels."""
        return self.rows.boxes()[self.vision_mask]

    @property
    def views(self) -> list[ViewGeometry]:
        return self.rows.views

    @property
    def frame_ranges(self) -> Int[Tensor, "v 2"]:
        """Frames ``[start, end)`` each vision token sees (``[0, 1)`` for an image)."""
        spans = torch.tensor([list(v.frames or (0, 1)) for v in self.views] or [[0, 1]])
        return spans[self.rows.view[self.vision_mask]]

    @property
    def time_ranges(self) -> Float[Tensor, "v 2"]:
        """Seconds of the first and last frame each vision token sees (NaN when unknown)."""
        spans = torch.tensor([list(v.times or (math.nan, math.nan)) for v in self.views]
                             or [[math.nan, math.nan]], dtype=torch.float64)
        return spans[self.rows.view[self.vision_mask]]


@dataclass
class TokenInfo:
    """What one sequence position is, as ``VisionLayout.token_info`` reports it: the image (or
    video) of the example it belongs to, the view, its row and column in the view's grid and
    its box in original pixels; for a video token also the frames ``[start, end)`` and the
    seconds it spans. ``label()`` is its name in ``HookedMLLM.to_str_tokens``.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        layout = model.prepare_examples(zoo.examples("toy-llava", 1, seed=0)).layout
        info = layout.token_info(0, int(layout.vision_positions(0)[5]))
        info.image, info.row, info.col, info.box  # (0, 0, 5, (40.0, 0.0, 48.0, 8.0))
        info.label()  # '<img 0:r0,c5>'
        ```
    """

    example: int
    position: int
    image: int  # index of the image, or of the video when ``modality == "video"``
    view: str
    row: int
    col: int
    box: tuple[float, float, float, float]
    modality: str = "image"
    frames: tuple[int, int] | None = None  # video frames [start, end) the token sees
    times: tuple[float, float] | None = None  # seconds of its first and last frame
    multi_view: bool = False  # its image has several views (anyres tiles + base, ...)

    def label(self) -> str:
        """The token's label, as ``HookedMLLM.to_str_tokens`` shows it: ``<img 0:r3,c5>``
        (``<img 0:r3,c5,VIEW>`` when the image has several views), a video token
        ``<vid 0:f2-3,1-1.5s,r3,c5>`` (its frames, and the seconds of its first and last frame
        when the fps is known), a structural row ``<img 0:nl>`` / ``<vid 0:nl>``."""
        tag = "vid" if self.modality == "video" else "img"
        if self.view == "newline":
            return f"<{tag} {self.image}:nl>"
        cell = f"r{self.row},c{self.col}"
        if self.modality == "video":
            return f"<vid {self.image}:{span_label(self.frames or (0, 1), self.times)},{cell}>"
        if self.multi_view:
            return f"<img {self.image}:{cell},{self.view}>"
        return f"<img {self.image}:{cell}>"


def _seconds(t: float) -> str:
    return f"{t:.2f}".rstrip("0").rstrip(".")


def span_label(frames: tuple[int, int], times: tuple[float, float] | None = None) -> str:
    """A video token's frames ``[a, b)`` as ``f{a}`` (one frame) or ``f{a}-{b - 1}``, with
    ``,{t}s`` / ``,{t_first}-{t_last}s`` when the seconds are known (2 decimals at most)."""
    a, b = frames
    out = f"f{a}" if b == a + 1 else f"f{a}-{b - 1}"
    if times is not None and all(math.isfinite(t) for t in times):
        t0, t1 = _seconds(times[0]), _seconds(times[1])
        out += f",{t0}s" if t0 == t1 else f",{t0}-{t1}s"
    return out


def box_overlap_fraction(
    token_boxes: Float[Tensor, "n 4"], region: Float[Tensor, "4"]
) -> Float[Tensor, " n"]:
    """Fraction of each token's area that lies inside ``region`` (0 for an empty token box)."""
    x0 = torch.maximum(token_boxes[:, 0], region[0])
    y0 = torch.maximum(token_boxes[:, 1], region[1])
    x1 = torch.minimum(token_boxes[:, 2], region[2])
    y1 = torch.minimum(token_boxes[:, 3], region[3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = (token_boxes[:, 2] - token_boxes[:, 0]) * (token_boxes[:, 3] - token_boxes[:, 1])
    return torch.where(area > 0, inter / area.clamp(min=1e-12), torch.zeros_like(area))


def check_box(box: Sequence[float], size: tuple[int, int], where: str = "") -> Tensor:
    """Validate an ``(x0, y0, x1, y1)`` box against an image of ``size = (w, h)``; the box as a
    tensor."""
    return torch.tensor(validate_box(box, size, where))


def validate_box(box: Sequence[float], size: tuple[int, int],
                 where: str = "") -> tuple[float, float, float, float]:
    """``check_box`` without the tensor: the box as floats, or a ``LayoutError``."""
    if len(box) != 4:
        raise LayoutError(f"{where}box {tuple(box)} must have 4 numbers (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = size
    if not (x0 < x1 and y0 < y1):
        raise LayoutError(f"{where}box {tuple(box)} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise LayoutError(
            f"{where}box {tuple(box)} lies outside the image of size {w}x{h} (width x height); "
            "boxes are (x0, y0, x1, y1) in original-image pixels, x1/y1 exclusive"
        )
    return x0, y0, x1, y1


@dataclass
class VisionLayout:
    """Per example, per image (and video): vision-token positions, grids and boxes in original
    pixels, and for video tokens the frames and seconds they span.

    ``images[e]``: example e's images in order, then its videos in order (see the module doc).
    Positions come back as ``Int[Tensor, "v"]`` (``vision_positions``, ``positions_in_box``,
    ``positions_in_frames``), the mask of all vision tokens as ``Bool[Tensor, "batch seq"]``.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        layout = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0)).layout
        v = layout.vision_positions(0)  # V_e of example 0: [64]
        layout.vision_mask().shape  # [batch, seq]
        layout.token_info(0, int(v[0])).label()  # '<img 0:r0,c0>'
        layout.positions_in_box(0, (0, 0, 16, 16))  # the 4 tokens covering that box
        ```
    """

    images: list[list[ImageLayout]]  # [example][image..., video...]
    seq_len: int
    # per example, position -> (image, row): built on the first ``token_info`` (a python dict of
    # every vision token costs more than the rest of the layout, and most batches never ask)
    _by_position: list[dict[int, tuple[int, int]]] | None = field(default=None, repr=False,
                                                                   compare=False)

    def _position_table(self, example: int) -> dict[int, tuple[int, int]]:
        if self._by_position is None:
            self._by_position = []
            for ex in self.images:
                table: dict[int, tuple[int, int]] = {}
                for i, img in enumerate(ex):
                    for j, p in enumerate(img.positions.tolist()):
                        table[p] = (i, j)
                self._by_position.append(table)
        return self._by_position[example]

    @property
    def n_examples(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[list[ImageLayout]]:
        return iter(self.images)

    def vision_positions(self, example: int, image: int | None = None, *,
                         video: int | None = None) -> Int[Tensor, " v"]:
        """V_e: positions of image-feature tokens (every view, image and video), structural
        rows excluded; or those of one ``image`` / one ``video``."""
        imgs = self._entries(example, image, video)
        if not imgs:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([img.vision_positions for img in imgs])

    def vision_mask(self) -> Bool[Tensor, "batch seq"]:
        mask = torch.zeros(self.n_examples, self.seq_len, dtype=torch.bool)
        for e in range(self.n_examples):
            mask[e, self.vision_positions(e)] = True
        return mask

    def boxes(self, example: int, image: int | None = None, *,
              video: int | None = None) -> Float[Tensor, "v 4"]:
        imgs = self._entries(example, image, video)
        if not imgs:
            return torch.zeros(0, 4)
        return torch.cat([img.boxes for img in imgs])

    def positions_in_frames(self, example: int, video: int,
                            frames: tuple[int, int] | None = None) -> Int[Tensor, " r"]:
        """Every vision token of ``video`` that sees a frame in ``[start, end)`` (all frames:
        None)."""
        img, keep, _ = self._select(example, None, video, frames)
        return img.vision_positions[keep.bool()]

    def positions_in_box(
        self,
        example: int,
        box: Sequence[float],
        image: int = 0,
        tau: float = 0.5,
        fallback_to_max: bool = True,
        *,
        video: int | None = None,
        frames: tuple[int, int] | None = None,
    ) -> Int[Tensor, " r"]:
        """R_e: vision tokens (every view) whose box overlaps ``box`` by >= ``tau`` of its area.

        With ``video=v``: the tokens of video v that see a frame in ``frames = (start, end)``
        (end exclusive; None: every frame) AND overlap ``box`` (in frame pixels) by >= tau.
        If none reaches tau, the tokens with the largest overlap (among those frames); if the
        region overlaps no token at all (it lies in a cropped-away part), a ``LayoutError``
        naming the example.
        """
        img, in_frames, where = self._select(example, image, video, frames)
        region = check_box(box, img.size, where=f"{where}: ")
        frac = box_overlap_fraction(img.boxes, region) * in_frames
        keep = frac >= tau
        if not keep.any():
            if not fallback_to_max or frac.max() <= 0:
                raise LayoutError(
                    f"{where}: region {tuple(region.tolist())} overlaps "
                    "no vision token (it lies in a part of the image the processor cropped away "
                    "or padded); pick a box inside the visible image"
                )
            keep = frac == frac.max()
        return img.vision_positions[keep]

    def positions_in_mask(
        self, example: int, mask: Bool[Tensor, "h w"], image: int = 0, tau: float = 0.5, *,
        video: int | None = None, frames: tuple[int, int] | None = None,
    ) -> Int[Tensor, " r"]:
        """Vision tokens covering a pixel mask of the original image (or of every frame in
        ``frames`` of ``video``) by >= ``tau`` of area."""
        img, in_frames, where = self._select(example, image, video, frames)
        w, h = img.size
        if tuple(mask.shape) != (h, w):
            raise LayoutError(
                f"{where}: mask shape {tuple(mask.shape)} != image "
                f"(height, width) = {(h, w)}"
            )
        integral = torch.zeros(h + 1, w + 1, dtype=torch.float64)
        integral[1:, 1:] = mask.double().cumsum(0).cumsum(1)
        boxes = img.boxes.double()
        fracs = []
        for x0, y0, x1, y1 in boxes.tolist():
            # tokens edges are fractional: count whole pixels whose centres fall inside
            xi0, yi0 = int(round(x0)), int(round(y0))
            xi1, yi1 = max(int(round(x1)), xi0), max(int(round(y1)), yi0)
            area = (xi1 - xi0) * (yi1 - yi0)
            inside = (integral[yi1, xi1] - integral[yi0, xi1] - integral[yi1, xi0]
                      + integral[yi0, xi0])
            fracs.append(float(inside) / area if area > 0 else 0.0)
        frac = torch.tensor(fracs) * in_frames
        if frac.max() <= 0:
            raise LayoutError(f"{where}: the mask covers no vision token")
        keep = frac >= tau if (frac >= tau).any() else frac == frac.max()
        return img.vision_positions[keep]

    def token_info(self, example: int, position: int) -> TokenInfo | None:
        """What sits at ``position``: (image or video, view, row, col, box, frames, seconds), or
        None for a text token."""
        hit = self._position_table(example).get(int(position))
        if hit is None:
            return None
        i, j = hit
        img = self.images[example][i]
        rows = img.rows
        if rows.kind[j] != KIND_VISION:
            return TokenInfo(example, int(position), img.image_index, "newline", int(rows.row[j]),
                             -1, (0.0, 0.0, 0.0, 0.0), img.modality)
        v = int(rows.view[j])
        geom = rows.views[v]
        r, c = int(rows.row[j]), int(rows.col[j])
        box = tuple(float(x) for x in geom.boxes[r, c].tolist())
        return TokenInfo(example, int(position), img.image_index, geom.name, r, c, box,  # type: ignore[arg-type]
                         img.modality, geom.frames, geom.times, len(rows.views) > 1)

    def image(self, example: int, image: int) -> ImageLayout:
        """The layout of image ``image`` of ``example``."""
        return self._image(example, image)

    def video(self, example: int, video: int) -> ImageLayout:
        """The layout of video ``video`` of ``example``."""
        self._check_example(example)
        vids = [im for im in self.images[example] if im.is_video]
        if not 0 <= video < len(vids):
            raise LayoutError(f"example {example} has {len(vids)} video(s); no video {video}")
        return vids[video]

    def _check_example(self, example: int) -> None:
        if not 0 <= example < self.n_examples:
            raise LayoutError(f"example {example} out of range (batch has {self.n_examples})")

    def _image(self, example: int, image: int) -> ImageLayout:
        self._check_example(example)
        imgs = [im for im in self.images[example] if not im.is_video]
        if not 0 <= image < len(imgs):
            raise LayoutError(f"example {example} has {len(imgs)} image(s); no image {image}")
        return imgs[image]

    def _entries(self, example: int, image: int | None, video: int | None) -> list[ImageLayout]:
        if video is not None:
            return [self.video(example, video)]
        if image is not None:
            return [self._image(example, image)]
        return self.images[example]

    def _select(self, example: int, image: int | None, video: int | None,
                frames: tuple[int, int] | None) -> tuple[ImageLayout, Tensor, str]:
        """(entry, 0/1 per vision token: sees a frame in ``frames``, 'example e, ...' label)."""
        if video is None:
            if frames is not None:
                raise LayoutError(f"example {example}: frames={frames} needs a video (pass "
                                  "video=); images have no frames")
            img = self._image(example, 0 if image is None else image)
            return img, torch.ones(len(img.vision_positions)), f"example {example}, image {image}"
        img = self.video(example, video)
        where = f"example {example}, video {video}"
        if frames is None:
            return img, torch.ones(len(img.vision_positions)), where
        a, b = int(frames[0]), int(frames[1])
        if b <= a:
            raise LayoutError(f"{where}: frame range [{a}, {b}) is empty (0-based, end "
                              f"exclusive: frames [a, a + 1) is frame a alone)")
        if not 0 <= a < b <= img.n_frames:
            raise LayoutError(f"{where}: frame range [{a}, {b}) lies outside the video's "
                              f"{img.n_frames} frame(s) (0-based, end exclusive)")
        spans = img.frame_ranges
        hit = (spans[:, 0] < b) & (spans[:, 1] > a)
        return img, hit.float(), f"{where}, frames [{a}, {b})"

    def shifted(self, offsets: Sequence[int], seq_len: int) -> "VisionLayout":
        """The same layout with example e's positions moved by ``offsets[e]`` (re-padding)."""
        imgs = [[replace(im, positions=im.positions + off) for im in ex]
                for ex, off in zip(self.images, offsets)]
        return VisionLayout(imgs, seq_len)
