"""corelens's own JSONL format: ``load_jsonl`` / ``save_jsonl`` (images, videos, evidence of
every kind; described in ``docs/data.md``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from corelens.data.examples import Evidence, GroundedExample, Video
from corelens.data.loaders.common import (
    ImageCache,
    frame_files,
    is_number,
    line_label,
    located_error,
    skip_or_raise,
    text_field,
)
from corelens.errors import InputError

_JSONL_KEYS = {"id", "images", "image", "videos", "question", "answer", "boxes", "distractors",
               "metadata", "raw_prompt"}
_VIDEO_KEYS = {"frames", "fps", "frame_indices", "total_frames"}


def _box_entries(value: Any, field: str) -> list[Evidence]:
    """``[[x0, y0, x1, y1], ...]`` (image 0), ``[{"image": i, "box": [...]}, ...]``,
    ``{"page": i, "box": ...}``, ``{"video": v, "frames": [a, b], "box": ...}`` (or ``"frame":
    f``) and ``{"video": v, "track": {"f": box, ...}}``, mixed."""
    if not isinstance(value, list):
        raise InputError(f"{field!r} must be a list of boxes, got {type(value).__name__}")
    out: list[Evidence] = []
    for k, item in enumerate(value):
        where = f"{field}[{k}]"
        if isinstance(item, dict):
            for key in ("image", "page", "video", "frame"):
                v = item.get(key, 0)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise InputError(f"{where}: the {key} index must be an integer, got {v!r}")
            boxes = list(item["track"].values()) if isinstance(item.get("track"), dict) else \
                [item.get("box")]
            if "track" not in item and "box" not in item:
                raise InputError(f"{where} must look like {{\"image\": 1, \"box\": "
                                 f"[x0, y0, x1, y1]}}, got keys {sorted(item)}")
        else:
            boxes = [item]
        for box in boxes:
            if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
                raise InputError(f"{where} must be [x0, y0, x1, y1] (4 finite numbers), "
                                 f"got {box!r}")
        try:
            out.append(Evidence.from_json(item))
        except (InputError, ValueError, TypeError) as e:
            raise InputError(f"{where}: {e}") from None
    return out


def _videos(value: Any, base: Path) -> list[Video]:
    """``"videos": [{"frames": [paths] | "folder", "fps", "frame_indices", "total_frames"}]``;
    a folder's frames are its numbered images (``frame_files``), their numbers the indices."""
    if not isinstance(value, list):
        raise InputError(f"'videos' must be a list, got {type(value).__name__}")
    out = []
    for k, v in enumerate(value):
        if not isinstance(v, dict) or "frames" not in v or set(v) - _VIDEO_KEYS:
            raise InputError(f"videos[{k}] must be an object with \"frames\" (and optionally "
                             f"{sorted(_VIDEO_KEYS - {'frames'})}), got {v!r}")
        fr, indices = v["frames"], v.get("frame_indices")
        if isinstance(fr, str):
            files = frame_files(base / fr)
            paths, indices = list(files.values()), indices or list(files)
        elif isinstance(fr, list) and fr and all(isinstance(p, str) and p for p in fr):
            paths = [base / p for p in fr]
        else:
            raise InputError(f"videos[{k}].frames must be a folder or a list of paths")
        frames = []
        for p in paths:
            if not p.is_file():
                raise InputError(f"videos[{k}]: frame {str(p)!r} not found")
            try:
                with Image.open(p) as im:
                    frames.append(im.convert("RGB"))
            except OSError as e:
                raise InputError(f"videos[{k}]: frame {str(p)!r} could not be read: {e}") \
                    from None
        fps = v.get("fps")
        if fps is not None and not (is_number(fps) and fps > 0):
            raise InputError(f"videos[{k}].fps must be a positive number, got {fps!r}")
        out.append(Video(frames, fps=fps, frame_indices=indices,
                         total_frames=v.get("total_frames")))
    return out


# ------------------------------------------------------------------------------------ JSONL


def load_jsonl(path: str | os.PathLike[str], *, skip_invalid: bool = False,
               load_images: bool = True) -> list[GroundedExample]:
    """Load grounded examples from corelens's JSONL format (one JSON object per line).

    Image paths are relative to the JSONL file's folder (absolute paths work too). Blank lines
    are ignored; line numbers in messages count every line from 1. Every example is validated
    (files exist and are images, boxes are non-empty and inside their image, question and answer
    are non-empty, ids are unique). ``load_images=False`` leaves the images undecoded (lazily
    opened: the size is known, the pixels are decoded on first use, in the file's own mode).

    Example:
        ```python
        import tempfile
        from pathlib import Path
        from corelens import load_jsonl, save_jsonl, zoo

        examples = zoo.examples("toy-llava", 4, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_jsonl(examples, Path(tmp) / "data.jsonl")
            back = load_jsonl(path)  # validated GroundedExamples
        [e.answer for e in back] == [e.answer for e in examples]  # True
        ```
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    images = ImageCache(decode=load_images)
    out: list[GroundedExample] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            ex_id = _guess_id(raw.decode("utf-8", errors="replace"))
            try:
                try:
                    record = json.loads(raw.decode("utf-8").strip())
                except UnicodeDecodeError as e:
                    raise InputError(f"not UTF-8: {e}") from None
                except json.JSONDecodeError as e:
                    raise InputError(f"not valid JSON: {e.msg} at column {e.colno}") from None
                if not isinstance(record, dict):
                    raise InputError(f"expected a JSON object, got {type(record).__name__}")
                ex_id = record.get("id")
                if ex_id is not None and not isinstance(ex_id, str):
                    ex_id = str(ex_id)
                ex = _from_record(record, ex_id, path.parent, images)
                if ex_id is not None and ex_id in seen:
                    raise InputError(f"duplicate id {ex_id!r} (ids must be unique)")
            except InputError as e:
                where = line_label(path.name, lineno, ex_id)
                skip_or_raise(located_error(where, e, ex_id), skip_invalid)
                continue
            if ex_id is not None:
                seen.add(ex_id)
            out.append(ex)
    return out


def _guess_id(line: str) -> str | None:
    """The id of a line that may not parse, so even a JSON error can name its example."""
    m = re.search(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"', line)
    return m.group(1) if m else None


def _from_record(record: dict[str, Any], ex_id: str | None, base: Path,
                 images: ImageCache) -> GroundedExample:
    unknown = set(record) - _JSONL_KEYS
    if unknown:
        raise InputError(f"unknown field(s) {sorted(unknown)}; known: {sorted(_JSONL_KEYS)} "
                         "(put anything else under \"metadata\")")
    if "images" in record and "image" in record:
        raise InputError("give either \"images\" (a list) or \"image\" (one path), not both")
    if "image" in record:
        files = [record["image"]]
    elif "images" in record:
        files = record["images"]
        if not isinstance(files, list):
            raise InputError(f"'images' must be a list of paths, got {type(files).__name__}")
    elif "videos" in record:
        files = []
    else:
        raise InputError("missing field 'images' (or 'image', or 'videos')")
    if (files or "videos" not in record) and not (
            files and all(isinstance(p, str) and p for p in files)):
        raise InputError(f"image paths must be non-empty strings, got {files!r}")
    question, answer = text_field(record, "question"), text_field(record, "answer")
    if "boxes" not in record:
        raise InputError("missing field 'boxes'")
    boxes = _box_entries(record["boxes"], "boxes")
    distractors = _box_entries(record.get("distractors", []), "distractors")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"'metadata' must be an object, got {type(metadata).__name__}")
    raw_prompt = record.get("raw_prompt", False)
    if not isinstance(raw_prompt, bool):
        raise InputError(f"'raw_prompt' must be true or false, got {raw_prompt!r}")
    loaded = [images.get(base / p, p) for p in files]
    videos = _videos(record["videos"], base) if "videos" in record else []
    ex = GroundedExample(loaded, question, answer, boxes, distractors, id=ex_id,
                         metadata=metadata, videos=videos, raw_prompt=raw_prompt)
    ex.validate()
    return ex


def save_jsonl(examples: Iterable[GroundedExample], path: str | os.PathLike[str],
               image_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write examples in the format ``load_jsonl`` reads; returns the JSONL path.

    Images are written as PNG to ``image_dir`` (default: ``<stem>_images/`` beside the JSONL
    file), one file per distinct image object (examples sharing an image share its file), and
    referenced by paths relative to the JSONL file's folder; video frames likewise, as
    ``<example>_v<video>_<frame>.png`` (once per distinct video), with each video's fps and
    frame indices. Examples are
    validated first and the JSONL file is only written once all of them passed.

    Example:
        ```python
        import tempfile
        from pathlib import Path
        from corelens import save_jsonl, zoo

        with tempfile.TemporaryDirectory() as tmp:
            path = save_jsonl(zoo.examples("toy-llava", 4, seed=0), Path(tmp) / "data.jsonl")
            sorted(p.name for p in (Path(tmp) / "data_images").iterdir())[:2]  # the PNGs
        ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img_dir = Path(image_dir) if image_dir is not None else path.parent / f"{path.stem}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    # id(image) -> (image, path in the JSONL); holding the image keeps its id from being reused
    written: dict[int, tuple[Image.Image, str]] = {}
    written_videos: dict[int, tuple[Video, list[str]]] = {}
    lines: list[str] = []
    for n, ex in enumerate(examples):
        where = f"example {n}" + ("" if ex.id is None else f" (id {ex.id!r})")
        try:
            ex.validate()
        except InputError as e:
            raise located_error(where, e, ex.id) from None
        files = []
        for i, im in enumerate(ex.images):
            if id(im) not in written:
                file = img_dir / f"{n:05d}_{i}.png"
                im.convert("RGB").save(file, format="PNG")
                written[id(im)] = (im, Path(os.path.relpath(file, path.parent)).as_posix())
            files.append(written[id(im)][1])
        record: dict[str, Any] = {} if ex.id is None else {"id": ex.id}
        if files or not ex.videos:
            record["images"] = files
        if ex.videos:
            record["videos"] = []
            for v, video in enumerate(ex.videos):
                if id(video) not in written_videos:  # examples sharing a video share its files
                    paths = []
                    for k, fr in enumerate(video.frames):
                        file = img_dir / f"{n:05d}_v{v}_{k}.png"
                        fr.save(file, format="PNG")
                        paths.append(Path(os.path.relpath(file, path.parent)).as_posix())
                    written_videos[id(video)] = (video, paths)
                paths = written_videos[id(video)][1]
                rec_v: dict[str, Any] = {"frames": paths, "frame_indices": video.frame_indices,
                                         "total_frames": video.total_frames}
                if video.fps is not None:
                    rec_v["fps"] = video.fps
                record["videos"].append(rec_v)
        record["question"] = str(ex.question)
        if getattr(ex, "raw_prompt", False):
            record["raw_prompt"] = True
        record.update(answer=str(ex.answer),
                      boxes=[Evidence.coerce(e).to_json() for e in ex.boxes])
        if ex.distractors:
            record["distractors"] = [Evidence.coerce(e).to_json() for e in ex.distractors]
        if ex.metadata:
            record["metadata"] = ex.metadata
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: metadata is not JSON-serialisable: {e}") from None
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
