"""What every loader shares: error prefixes and skipping, image opening (once per load call),
number checks, and video frames on disk (``frame_files``, ``sample_frames``, reading frames,
scaling annotation boxes to the frame files' pixels).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from corelens.data.examples import Box
from corelens.errors import InputError

# ---------------------------------------------------------------------------------- helpers


class ImageCache:
    """Opens each image file once per load call, so examples that share a file share the image.

    ``decode=True`` gives fully decoded RGB images (the file is closed at once);
    ``decode=False`` gives ``Image.open`` handles: the size is read from the header, the pixels
    are decoded on first use, and each distinct file stays open until then.
    """

    def __init__(self, decode: bool) -> None:
        self.decode = decode
        self.cache: dict[Path, Image.Image | InputError] = {}

    def get(self, path: Path, shown: str) -> Image.Image:
        key = path.resolve()
        if key not in self.cache:
            self.cache[key] = self._open(path, shown)
        got = self.cache[key]
        if isinstance(got, InputError):
            raise InputError(str(got))
        return got

    def _open(self, path: Path, shown: str) -> Image.Image | InputError:
        if not path.is_file():
            return InputError(f"image {shown!r} not found ({path})")
        try:
            if not self.decode:
                return Image.open(path)
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:  # includes PIL.UnidentifiedImageError
            return InputError(f"image {shown!r} could not be read: {e}")


def located_error(where: str, e: InputError, ex_id: Any = None) -> InputError:
    """Prefix an error with where it happened (dropping ``validate``'s own example prefix)."""
    prefix = "example: " if ex_id is None else f"example {ex_id!r}: "
    return InputError(f"{where}: {str(e).removeprefix(prefix)}")


def line_label(name: str, lineno: int, ex_id: str | None) -> str:
    return f"{name} line {lineno} " + ("(no id)" if ex_id is None else f"(id {ex_id!r})")


def skip_or_raise(err: InputError, skip: bool) -> None:
    if not skip:
        raise err
    warnings.warn(f"skipped: {err}", stacklevel=3)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def text_field(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise InputError(f"missing field {key!r}")
    if not isinstance(record[key], str):
        raise InputError(f"{key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]



# COCO boxes overshooting the image edge by less than this (float rounding in the annotations)
# are clipped to the image rather than rejected.
EDGE_TOLERANCE = 1.0


# ------------------------------------------------------------------------ video frames on disk

_FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_files(folder: str | os.PathLike[str], offset: int = 0) -> dict[int, Path]:
    """The frame images of one video extracted to ``folder``, by source frame index.

    A file's index is the last integer in its name minus ``offset`` (``ffmpeg -i v.mp4
    %06d.jpg`` numbers frames from 1: pass ``offset=1``; ``frame_000120.png`` is frame 120 with
    the default). Files without a number, or of other types, are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"frames folder {folder} not found")
    out: dict[int, Path] = {}
    for p in folder.iterdir():
        m = re.findall(r"\d+", p.stem)
        if p.suffix.lower() in _FRAME_EXTS and m:
            idx = int(m[-1]) - offset
            if idx in out:
                raise InputError(f"{folder}: {out[idx].name} and {p.name} are both frame {idx}")
            out[idx] = p
    if not out:
        raise InputError(f"{folder} holds no numbered frame images ({', '.join(_FRAME_EXTS)})")
    return dict(sorted(out.items()))


def sample_frames(available: Iterable[int], n: int, start: int | None = None,
                  end: int | None = None) -> list[int]:
    """``n`` of the ``available`` frame indices within ``[start, end]`` (inclusive), evenly
    spaced over the available ones (all of them if there are at most ``n``)."""
    cand = sorted(i for i in available if (start is None or i >= start)
                  and (end is None or i <= end))
    if not cand:
        raise InputError(f"no frame available between {start} and {end}")
    if len(cand) <= n:
        return cand
    pick = [round(k * (len(cand) - 1) / (n - 1)) for k in range(n)] if n > 1 else \
        [(len(cand) - 1) // 2]
    return [cand[k] for k in pick]


def read_frames(files: dict[int, Path], indices: list[int], shown: str) -> list[Image.Image]:
    out = []
    for i in indices:
        try:
            with Image.open(files[i]) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise InputError(f"frame {i} of {shown} ({files[i]}) could not be read: {e}") from None
    return out


def scale_box(box: Any, src: tuple[float, float], dst: tuple[int, int],
               what: str) -> Box:
    """``[x0, y0, x1, y1]`` in an annotation's ``src = (w, h)`` -> ``dst`` pixels (clipped by
    at most 1 px of annotation slack)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(is_number(v) for v in box)):
        raise InputError(f"{what}: box must be [x0, y0, x1, y1], got {box!r}")
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    tol_x, tol_y = EDGE_TOLERANCE * sx, EDGE_TOLERANCE * sy
    x0 = 0.0 if -tol_x < x0 < 0 else x0
    y0 = 0.0 if -tol_y < y0 < 0 else y0
    x1 = float(dst[0]) if dst[0] < x1 < dst[0] + tol_x else x1
    y1 = float(dst[1]) if dst[1] < y1 < dst[1] + tol_y else y1
    if not (0 <= x0 < x1 <= dst[0] and 0 <= y0 < y1 <= dst[1]):
        raise InputError(f"{what}: box {list(box)} (in {src[0]:g}x{src[1]:g}) is empty or "
                         f"outside the {dst[0]}x{dst[1]} frame")
    return float(x0), float(y0), float(x1), float(y1)


def load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
