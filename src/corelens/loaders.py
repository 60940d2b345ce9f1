"""Grounded-data loaders: corelens's JSONL format, RefCOCO / RefCOCO+ / RefCOCOg, and the
video / document benchmarks VidSTG, MLVU and MMDocIR (frames and pages from local files).

Every loader returns validated ``GroundedExample``s. A problem with one example is an
``InputError`` naming the file, the line (JSONL), ref (RefCOCO) or record and the example id; with
``skip_invalid=True`` that example is skipped with one warning instead and every valid example
is still returned, in file order. The formats are described in ``docs/data.md``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from corelens.errors import InputError
from corelens.examples import Box, Evidence, GroundedExample, Video

__all__ = ["MLVU_TEMPLATE", "MMDOCIR_TEMPLATE", "REFCOCO_TEMPLATE", "VIDSTG_CAPTION_TEMPLATE",
           "VIDSTG_QUESTION_TEMPLATE", "frame_files", "load_jsonl", "load_mlvu", "load_mmdocir",
           "load_refcoco", "load_vidstg", "sample_frames", "save_jsonl", "vidstg_answer"]

_JSONL_KEYS = {"id", "images", "image", "videos", "question", "answer", "boxes", "distractors",
               "metadata"}
_VIDEO_KEYS = {"frames", "fps", "frame_indices", "total_frames"}


# ---------------------------------------------------------------------------------- helpers


class _Images:
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


def _fail(where: str, e: InputError, ex_id: Any = None) -> InputError:
    """Prefix an error with where it happened (dropping ``validate``'s own example prefix)."""
    prefix = "example: " if ex_id is None else f"example {ex_id!r}: "
    return InputError(f"{where}: {str(e).removeprefix(prefix)}")


def _line(name: str, lineno: int, ex_id: str | None) -> str:
    return f"{name} line {lineno} " + ("(no id)" if ex_id is None else f"(id {ex_id!r})")


def _skip_or_raise(err: InputError, skip: bool) -> None:
    if not skip:
        raise err
    warnings.warn(f"skipped: {err}", stacklevel=3)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
            if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
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
        if fps is not None and not (_number(fps) and fps > 0):
            raise InputError(f"videos[{k}].fps must be a positive number, got {fps!r}")
        out.append(Video(frames, fps=fps, frame_indices=indices,
                         total_frames=v.get("total_frames")))
    return out


def _text(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise InputError(f"missing field {key!r}")
    if not isinstance(record[key], str):
        raise InputError(f"{key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


# ------------------------------------------------------------------------------------ JSONL


def load_jsonl(path: str | os.PathLike[str], *, skip_invalid: bool = False,
               load_images: bool = True) -> list[GroundedExample]:
    """Load grounded examples from corelens's JSONL format (one JSON object per line).

    Image paths are relative to the JSONL file's folder (absolute paths work too). Blank lines
    are ignored; line numbers in messages count every line from 1. Every example is validated
    (files exist and are images, boxes are non-empty and inside their image, question and answer
    are non-empty, ids are unique). ``load_images=False`` leaves the images undecoded (lazily
    opened: the size is known, the pixels are decoded on first use, in the file's own mode).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    images = _Images(decode=load_images)
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
                _skip_or_raise(_fail(_line(path.name, lineno, ex_id), e, ex_id), skip_invalid)
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
                 images: _Images) -> GroundedExample:
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
    question, answer = _text(record, "question"), _text(record, "answer")
    if "boxes" not in record:
        raise InputError("missing field 'boxes'")
    boxes = _box_entries(record["boxes"], "boxes")
    distractors = _box_entries(record.get("distractors", []), "distractors")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"'metadata' must be an object, got {type(metadata).__name__}")
    loaded = [images.get(base / p, p) for p in files]
    videos = _videos(record["videos"], base) if "videos" in record else []
    ex = GroundedExample(loaded, question, answer, boxes, distractors, id=ex_id,
                         metadata=metadata, videos=videos)
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
            raise _fail(where, e, ex.id) from None
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
        record.update(question=str(ex.question), answer=str(ex.answer),
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


# ---------------------------------------------------------------------------------- RefCOCO

#: Default RefCOCO question. Fields: ``{sentence}`` (the referring expression, trailing period
#: removed), ``{category}``, ``{supercategory}``; the default answer is ``{category}``, so the
#: model has to find the described object to name it.
REFCOCO_TEMPLATE = 'Which object does "{sentence}" refer to? Answer with its category name.'

_DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}

# COCO boxes overshooting the image edge by less than this (float rounding in the annotations)
# are clipped to the image rather than rejected.
_EDGE_TOLERANCE = 1.0


def load_refcoco(root: str | os.PathLike[str], dataset: str = "refcocog", split: str | None = "val",
                 split_by: str | None = None, *, images_dir: str | os.PathLike[str] | None = None,
                 skip_invalid: bool = False, limit: int | None = None,
                 template: str = REFCOCO_TEMPLATE,
                 answer_fn: Callable[[dict[str, Any]], str] | None = None,
                 max_distractors: int | None = None,
                 load_images: bool = True) -> list[GroundedExample]:
    """Load RefCOCO / RefCOCO+ / RefCOCOg (the ``refer`` layout) as grounded questions.

    Reads ``root/<dataset>/refs(<split_by>).p`` and ``root/<dataset>/instances.json``; images
    come from ``images_dir``, by default ``root/images`` or, if that folder does not exist,
    ``root/train2014`` (file names from ``instances.json``, e.g. ``COCO_train2014_*.jpg``).
    ``split_by`` defaults to ``umd`` for refcocog and ``unc`` for refcoco / refcoco+ (``google``
    works where the file exists). ``split=None`` keeps every split.

    One example per referring expression, id ``"{ref_id}:{sentence_index}"``: the question is
    ``template.format(**ctx)`` and the answer ``answer_fn(ctx)`` (default: the category name),
    where ``ctx`` holds ``sentence``, ``category``, ``supercategory``, ``ref_id``, ``ann_id``,
    ``image_id`` and ``sentence_index``. The evidence box is the referred annotation's box; the
    distractors are the image's other annotations, same category first, then the rest (each in
    ``instances.json`` order), at most ``max_distractors``. ``limit`` caps the number of
    examples returned (images beyond it are never opened).

    The refs file is a pickle: only load files from a source you trust.
    """
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    root = Path(root)
    folder = root / dataset
    if split_by is None:
        if dataset not in _DEFAULT_SPLIT_BY:
            raise InputError(f"no default split_by for dataset {dataset!r}; pass split_by= "
                             f"(defaults: {_DEFAULT_SPLIT_BY})")
        split_by = _DEFAULT_SPLIT_BY[dataset]
    refs_file, inst_file = folder / f"refs({split_by}).p", folder / "instances.json"
    if not refs_file.is_file():
        have = sorted(p.name for p in folder.glob("refs(*).p")) if folder.is_dir() else []
        raise InputError(f"{refs_file} not found (found here: {have or 'nothing'}); expected "
                         "root/<dataset>/refs(<split_by>).p")
    if not inst_file.is_file():
        raise InputError(f"{inst_file} not found; expected root/<dataset>/instances.json")
    refs = _load_refs(refs_file)
    try:
        inst = json.loads(inst_file.read_text(encoding="utf-8"))
        image_info = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
        cats = {c["id"]: c for c in inst["categories"]}
        by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for a in inst["annotations"]:
            by_image[a["image_id"]].append(a)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{inst_file} is not a COCO instances file: {e!r}") from None
    if images_dir is None:
        images_dir = root / "images" if (root / "images").is_dir() else root / "train2014"
    img_dir = Path(images_dir)
    if not img_dir.is_dir():
        raise InputError(f"images folder {img_dir} not found; pass images_dir= (default: "
                         "root/images, else root/train2014)")
    if split is not None:
        chosen = [r for r in refs if r.get("split") == split]
        if not chosen:
            splits = sorted({str(r.get("split")) for r in refs})
            raise InputError(f"{refs_file.name}: no refs in split {split!r}; splits: {splits}")
        refs = chosen
    answer_fn = answer_fn or (lambda ctx: ctx["category"])
    images = _Images(decode=load_images)
    source = f"{dataset}/{refs_file.name}"
    out: list[GroundedExample] = []
    for ref in tqdm(refs, desc=f"{dataset} {split}", leave=False, disable=None):
        if limit is not None and len(out) >= limit:
            break
        ref_id = ref.get("ref_id")
        sentences = ref.get("sentences") or []
        ids = f"{ref_id}:0" if len(sentences) <= 1 else f"{ref_id}:0..{len(sentences) - 1}"
        try:
            try:
                image, box, distractors, dist_anns, cat = _ref_parts(
                    ref, anns, image_info, cats, by_image, images, img_dir, max_distractors)
            except (KeyError, TypeError) as e:
                raise InputError(f"malformed ref or annotation: {e!r}") from None
            if not sentences:
                raise InputError("the ref has no sentences")
        except InputError as e:
            _skip_or_raise(_fail(f"{source} ref {ref_id} (ids {ids})", e), skip_invalid)
            continue
        for k, sent in enumerate(sentences):
            if limit is not None and len(out) >= limit:
                break
            ex_id = f"{ref_id}:{k}"
            try:
                text = sent.get("sent", sent.get("raw")) if isinstance(sent, dict) else None
                if not isinstance(text, str) or not text.strip().rstrip(".").strip():
                    raise InputError(f"sentence {k} is empty or missing: {sent!r}")
                text = text.strip().rstrip(".").strip()
                ctx = {"sentence": text, "category": cat["name"],
                       "supercategory": cat.get("supercategory", ""), "ref_id": ref_id,
                       "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                       "sentence_index": k}
                try:
                    question = template.format(**ctx)
                except (KeyError, IndexError) as e:
                    raise InputError(f"template {template!r} uses an unknown field {e}; "
                                     f"fields: {sorted(ctx)}") from None
                meta = {"dataset": dataset, "split_by": split_by, "split": ref.get("split"),
                        **ctx, "sent_id": sent.get("sent_id"), "category_id": cat["id"],
                        "file_name": image_info[ref["image_id"]]["file_name"],
                        "distractor_ann_ids": [a["id"] for a in dist_anns],
                        "distractor_categories": [cats.get(a.get("category_id"), {}).get("name")
                                                  for a in dist_anns]}
                ex = GroundedExample([image], question, answer_fn(ctx), [(0, box)],
                                     distractors, id=ex_id, metadata=meta).validate()
            except InputError as e:
                _skip_or_raise(_fail(f"{source} ref {ref_id} (id {ex_id!r})", e, ex_id),
                               skip_invalid)
                continue
            out.append(ex)
    return out


def _load_refs(path: Path) -> list[dict[str, Any]]:
    """The refs pickle. The public ones were written by Python 2: their byte strings are read as
    UTF-8, else latin-1."""
    try:
        with path.open("rb") as f:
            try:
                refs = pickle.load(f, encoding="utf-8")
            except UnicodeDecodeError:
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise InputError(f"{path} could not be unpickled: {e!r}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise InputError(f"{path} must hold a list of ref dicts, got {type(refs).__name__}")
    return refs


def _ref_parts(ref: dict[str, Any], anns: dict[Any, dict[str, Any]],
               image_info: dict[Any, dict[str, Any]], cats: dict[Any, dict[str, Any]],
               by_image: dict[Any, list[dict[str, Any]]], images: _Images, img_dir: Path,
               max_distractors: int | None,
               ) -> tuple[Image.Image, Box, list[tuple[int, Box]], list[dict[str, Any]],
                          dict[str, Any]]:
    """What every sentence of a ref shares: image, evidence box, distractors, category."""
    for key in ("ann_id", "image_id"):
        if key not in ref:
            raise InputError(f"the ref has no {key!r}")
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise InputError(f"annotation {ref['ann_id']} is not in instances.json")
    info = image_info.get(ref["image_id"])
    if info is None:
        raise InputError(f"image {ref['image_id']} is not in instances.json")
    cat = cats.get(ann["category_id"])
    if cat is None:
        raise InputError(f"category {ann['category_id']} is not in instances.json")
    # The ref's own "file_name" carries an annotation suffix (COCO_train2014_..._<ann>.jpg);
    # the image file is the one instances.json names.
    image = images.get(img_dir / info["file_name"], info["file_name"])
    if tuple(image.size) != (info.get("width"), info.get("height")):
        raise InputError(f"image {info['file_name']!r} is {image.size[0]}x{image.size[1]} but "
                         f"instances.json says {info.get('width')}x{info.get('height')} "
                         "(wrong images_dir?)")
    box = _coco_box(ann, image.size)
    others = [a for a in by_image[ref["image_id"]] if a["id"] != ann["id"]]
    ordered = ([a for a in others if a["category_id"] == ann["category_id"]]
               + [a for a in others if a["category_id"] != ann["category_id"]])
    if max_distractors is not None:
        ordered = ordered[:max_distractors]
    return image, box, [(0, _coco_box(a, image.size)) for a in ordered], ordered, cat


def _coco_box(ann: dict[str, Any], size: tuple[int, int]) -> Box:
    """COCO ``[x, y, w, h]`` -> ``(x0, y0, x1, y1)``, checked against the image."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        raise InputError(f"annotation {ann.get('id')}: bbox must be [x, y, w, h], got {bbox!r}")
    w, h = size
    x0, y0 = float(bbox[0]), float(bbox[1])
    x1, y1 = x0 + float(bbox[2]), y0 + float(bbox[3])
    if -_EDGE_TOLERANCE < x0 < 0:
        x0 = 0.0
    if -_EDGE_TOLERANCE < y0 < 0:
        y0 = 0.0
    if w < x1 < w + _EDGE_TOLERANCE:
        x1 = float(w)
    if h < y1 < h + _EDGE_TOLERANCE:
        y1 = float(h)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"annotation {ann.get('id')}: box {(x0, y0, x1, y1)} (bbox {bbox}) is "
                         f"empty or outside the {w}x{h} image")
    return x0, y0, x1, y1


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


def _read_frames(files: dict[int, Path], indices: list[int], shown: str) -> list[Image.Image]:
    out = []
    for i in indices:
        try:
            with Image.open(files[i]) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise InputError(f"frame {i} of {shown} ({files[i]}) could not be read: {e}") from None
    return out


def _scale_box(box: Any, src: tuple[float, float], dst: tuple[int, int],
               what: str) -> Box:
    """``[x0, y0, x1, y1]`` in an annotation's ``src = (w, h)`` -> ``dst`` pixels (clipped by
    at most 1 px of annotation slack)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_number(v) for v in box)):
        raise InputError(f"{what}: box must be [x0, y0, x1, y1], got {box!r}")
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    tol_x, tol_y = _EDGE_TOLERANCE * sx, _EDGE_TOLERANCE * sy
    x0 = 0.0 if -tol_x < x0 < 0 else x0
    y0 = 0.0 if -tol_y < y0 < 0 else y0
    x1 = float(dst[0]) if dst[0] < x1 < dst[0] + tol_x else x1
    y1 = float(dst[1]) if dst[1] < y1 < dst[1] + tol_y else y1
    if not (0 <= x0 < x1 <= dst[0] and 0 <= y0 < y1 <= dst[1]):
        raise InputError(f"{what}: box {list(box)} (in {src[0]:g}x{src[1]:g}) is empty or "
                         f"outside the {dst[0]}x{dst[1]} frame")
    return float(x0), float(y0), float(x1), float(y1)


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------- VidSTG

#: VidSTG question templates. ``{sentence}``: the annotation's sentence; the answer is the
#: queried object's category (``answer_fn`` to change it).
VIDSTG_QUESTION_TEMPLATE = "{sentence} Answer with the category of the object."
VIDSTG_CAPTION_TEMPLATE = 'Which object does "{sentence}" describe? Answer with its category.'


def vidstg_answer(category: str) -> str:
    """The default VidSTG answer: the VidOR category, first alternative, spaces for ``_``
    (``ball/sports_ball`` -> ``ball``)."""
    return category.split("/")[0].replace("_", " ")


def load_vidstg(annotations: str | os.PathLike[str], vidor_dir: str | os.PathLike[str],
                frames_dir: str | os.PathLike[str], *, num_frames: int = 8,
                kinds: tuple[str, ...] = ("questions",), frame_offset: int = 0,
                question_template: str = VIDSTG_QUESTION_TEMPLATE,
                caption_template: str = VIDSTG_CAPTION_TEMPLATE,
                answer_fn: Callable[[str], str] | None = None,
                max_distractors: int | None = None, skip_invalid: bool = False,
                limit: int | None = None) -> list[GroundedExample]:
    """Load VidSTG (Zhang et al. 2020) as grounded video questions with moving-box evidence.

    ``annotations``: VidSTG's ``{train,val,test}_annotations.json`` (a list of records with
    ``vid``, ``fps``, ``frame_count``, ``width``, ``height``, ``subject/objects``,
    ``used_segment``, ``temporal_gt`` and ``questions`` / ``captions`` of ``{description,
    type, target_id}``). ``vidor_dir``: the VidOR annotation folder (``<any>/<vid>.json``
    files, searched recursively) -- VidSTG's boxes are VidOR's ``trajectories`` (per frame,
    ``[{tid, bbox: {xmin, ymin, xmax, ymax}}]``). ``frames_dir``: the video frames you
    extracted, ``frames_dir/<vid>/`` with the source frame index in each file name
    (``frame_files``; ``frame_offset=1`` for ffmpeg's 1-based numbering).

    Per sentence of ``kinds`` (``"questions"`` interrogative, ``"captions"`` declarative) one
    example, id ``"{vid}:{segment begin}:{q|c}{k}"``: ``num_frames`` frames sampled evenly from
    the extracted frames of ``used_segment`` (``[begin_fid, end_fid]``, inclusive); the evidence
    is the queried object's track (``Evidence.in_track``: its box in every sampled frame of
    ``temporal_gt`` (``[begin_fid, end_fid)``) where VidOR has one); the distractors are the
    other objects' tracks over the same frames (same category first, at most
    ``max_distractors``). Boxes are scaled from the annotation's ``width x height`` to the
    frame files' size. The ``Video`` keeps the source fps and frame indices (token times are
    real seconds). A sentence whose object has no box in a sampled frame of ``temporal_gt``
    is invalid (``skip_invalid=True`` skips it with a warning). ``answer_fn(category)``: the
    answer (default ``vidstg_answer``).
    """
    answer_fn = answer_fn or vidstg_answer
    ann_path = Path(annotations)
    records = _load_json(ann_path, "VidSTG annotations")
    if not isinstance(records, list):
        raise InputError(f"{ann_path}: expected a list of VidSTG records")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    for k in kinds:
        if k not in ("questions", "captions"):
            raise InputError(f"kinds must name 'questions' and/or 'captions', not {k!r}")
    vidor_root = Path(vidor_dir)
    if not vidor_root.is_dir():
        raise InputError(f"VidOR annotation folder {vidor_root} not found")
    vidor_files = {p.stem: p for p in vidor_root.rglob("*.json")}
    vidor_cache: dict[str, Any] = {}
    out: list[GroundedExample] = []
    for n, rec in enumerate(tqdm(records, desc="VidSTG", leave=False, disable=None)):
        if limit is not None and len(out) >= limit:
            break
        vid = str(rec.get("vid")) if isinstance(rec, dict) else None
        where = f"{ann_path.name} record {n} (vid {vid})"
        try:
            if not isinstance(rec, dict):
                raise InputError(f"expected an object, got {type(rec).__name__}")
            try:
                seg, gt = rec["used_segment"], rec["temporal_gt"]
                objects = {o["tid"]: o["category"] for o in rec["subject/objects"]}
                size = (float(rec["width"]), float(rec["height"]))
                fps = float(rec["fps"])
                sentences = [(kind, k, s) for kind in kinds
                             for k, s in enumerate(rec.get(kind) or [])]
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"malformed VidSTG record: missing or bad {e}") from None
            if vid not in vidor_files:
                raise InputError(f"no VidOR annotation {vid}.json under {vidor_root}")
            if vid not in vidor_cache:
                vidor_cache[vid] = _load_json(vidor_files[vid], "VidOR annotation")
            trajectories = vidor_cache[vid].get("trajectories")
            if not isinstance(trajectories, list):
                raise InputError(f"{vidor_files[vid].name} has no 'trajectories' list")
            files = frame_files(Path(frames_dir) / vid, frame_offset)
            picked = sample_frames(files, num_frames, int(seg["begin_fid"]), int(seg["end_fid"]))
            frames = _read_frames(files, picked, f"video {vid}")
            video = Video(frames, fps=fps, frame_indices=picked,
                          total_frames=int(rec.get("frame_count") or picked[-1] + 1))
            in_gt = [(i, f) for i, f in enumerate(picked)
                     if int(gt["begin_fid"]) <= f < int(gt["end_fid"])]

            def track(tid: Any) -> dict[int, Box]:
                boxes: dict[int, Box] = {}
                for i, f in in_gt:
                    for b in (trajectories[f] if 0 <= f < len(trajectories) else []) or []:
                        if b.get("tid") == tid:
                            bb = b["bbox"]
                            boxes[i] = _scale_box(
                                [bb["xmin"], bb["ymin"], bb["xmax"], bb["ymax"]], size,
                                video.size, f"{vidor_files[vid].name} frame {f} tid {tid}")
                return boxes
        except InputError as e:
            _skip_or_raise(_fail(where, e), skip_invalid)
            continue
        for kind, k, sent in sentences:
            if limit is not None and len(out) >= limit:
                break
            ex_id = f"{vid}:{seg.get('begin_fid')}:{kind[0]}{k}"
            try:
                if not isinstance(sent, dict) or not str(sent.get("description", "")).strip():
                    raise InputError(f"{kind}[{k}] has no description: {sent!r}")
                tid = sent.get("target_id")
                if tid not in objects:
                    raise InputError(f"{kind}[{k}] targets tid {tid!r}, which is not in "
                                     "subject/objects")
                target = track(tid)
                if not target:
                    raise InputError(
                        f"object {tid} has no box in the {len(in_gt)} sampled frame(s) of "
                        f"temporal_gt [{gt['begin_fid']}, {gt['end_fid']}) (sampled source "
                        f"frames: {picked}); extract more frames or raise num_frames")
                others = [t for t in objects if t != tid]
                others = ([t for t in others if objects[t] == objects[tid]]
                          + [t for t in others if objects[t] != objects[tid]])
                dists = [(t, tr) for t in others if (tr := track(t))]
                if max_distractors is not None:
                    dists = dists[:max_distractors]
                template = question_template if kind == "questions" else caption_template
                text = str(sent["description"]).strip()
                meta = {"dataset": "vidstg", "vid": vid, "kind": kind, "index": k,
                        "sentence": text, "target_id": tid, "category": objects[tid],
                        "type": sent.get("type"), "frame_indices": picked,
                        "temporal_gt": [gt["begin_fid"], gt["end_fid"]],
                        "used_segment": [seg["begin_fid"], seg["end_fid"]],
                        "distractor_tids": [t for t, _ in dists]}
                ex = GroundedExample(
                    [], template.format(sentence=text), answer_fn(objects[tid]),
                    [Evidence.in_track(0, target)],
                    [Evidence.in_track(0, tr) for _, tr in dists], id=ex_id, metadata=meta,
                    videos=[video]).validate()
            except InputError as e:
                _skip_or_raise(_fail(f"{where} (id {ex_id!r})", e, ex_id), skip_invalid)
                continue
            out.append(ex)
    return out


# ------------------------------------------------------------------------------------- MLVU

#: MLVU's multiple-choice prompt (as in its evaluation code); the answer is the option letter.
MLVU_TEMPLATE = "Question: {question}\nOptions:\n{options}\nAnswer with the option's letter."


def load_mlvu(annotations: str | os.PathLike[str], frames_dir: str | os.PathLike[str], *,
              num_frames: int = 16, fps: float | None = None, frame_offset: int = 0,
              evidence: str | os.PathLike[str] | None = None,
              missing_evidence: str = "whole_video", template: str = MLVU_TEMPLATE,
              skip_invalid: bool = False, limit: int | None = None) -> list[GroundedExample]:
    """Load MLVU (Zhou et al. 2024) multiple-choice questions as grounded video examples.

    ``annotations``: one MLVU task file (``MLVU/json/1_plotQA.json`` ...) or the folder of
    them (read in name order): lists of ``{video, duration, question, candidates, answer,
    question_type}``, optionally with ``start`` / ``end`` (seconds) bounding the clip the
    question is about. ``frames_dir``: the frames you extracted, ``frames_dir/<video stem>/``
    numbered as in ``frame_files``; ``fps``: frames per second of that numbering (file index /
    fps = seconds; default: the number of the last frame + 1 over ``duration``).

    MLVU has no box or time annotations of its own. Evidence, in this order: a record's
    ``evidence`` entry -- a JSON/JSONL file you pass, of ``{"video", "question", "start",
    "end"[, "box"]}`` (seconds; box in frame pixels, default the whole frame); else the record's
    own ``start`` / ``end``; else ``missing_evidence``: ``"whole_video"`` (every frame, whole
    frame: R_e = V_e, so RAM equals visual mass -- fine for accuracy, useless for ranking
    heads; ``metadata["evidence_source"]`` says which) or ``"error"``. Evidence is
    ``Evidence.in_frames`` over the sampled frames shown within ``[start, end]`` (if none of
    the ``num_frames`` evenly sampled frames falls there, the one nearest the middle of the
    span replaces the sampled frame nearest to it). Id: ``"{task file stem}:{index}"``; the
    answer is the correct option's letter.
    """
    if missing_evidence not in ("whole_video", "error"):
        raise InputError(f"missing_evidence must be 'whole_video' or 'error', not "
                         f"{missing_evidence!r}")
    root = Path(annotations)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise InputError(f"no MLVU .json files in {root}")
    side: dict[tuple[str, str], dict[str, Any]] = {}
    if evidence is not None:
        ev_path = Path(evidence)
        if not ev_path.is_file():
            raise InputError(f"evidence file {ev_path} not found")
        text = ev_path.read_text(encoding="utf-8")
        try:
            items = json.loads(text) if text.lstrip().startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
            for it in items:
                side[(str(it["video"]), str(it["question"]).strip())] = it
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{ev_path}: evidence entries need \"video\", \"question\", "
                             f"\"start\", \"end\": {e!r}") from None
    out: list[GroundedExample] = []
    for path in files:
        records = _load_json(path, "MLVU annotations")
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a list of MLVU records")
        for n, rec in enumerate(tqdm(records, desc=f"MLVU {path.stem}", leave=False,
                                     disable=None)):
            if limit is not None and len(out) >= limit:
                return out
            ex_id = f"{path.stem}:{n}"
            try:
                if not isinstance(rec, dict):
                    raise InputError(f"expected an object, got {type(rec).__name__}")
                try:
                    name, question = str(rec["video"]), str(rec["question"]).strip()
                    cands, answer = [str(c) for c in rec["candidates"]], str(rec["answer"])
                except (KeyError, TypeError) as e:
                    raise InputError(f"malformed MLVU record: missing {e}") from None
                if answer not in cands:
                    raise InputError(f"answer {answer!r} is not one of the candidates {cands}")
                letters = [chr(ord("A") + i) for i in range(len(cands))]
                options = "\n".join(f"({c}) {t}" for c, t in zip(letters, cands))
                vfiles = frame_files(Path(frames_dir) / Path(name).stem, frame_offset)
                rate = fps
                if rate is None:
                    dur = rec.get("duration")
                    if not _number(dur) or dur <= 0:
                        raise InputError("no fps given and no positive 'duration' to derive it")
                    rate = (max(vfiles) + 1) / float(dur)
                picked = sample_frames(vfiles, num_frames)
                source = "whole_video"
                span: tuple[float, float] | None = None
                box: Any = None
                if (name, question) in side:
                    it = side[(name, question)]
                    span, box, source = (float(it["start"]), float(it["end"])), it.get("box"), \
                        "evidence_file"
                elif _number(rec.get("start")) and _number(rec.get("end")):
                    span, source = (float(rec["start"]), float(rec["end"])), "record_bounds"
                elif missing_evidence == "error":
                    raise InputError("MLVU gives no evidence for this question: pass "
                                     "evidence= (a file of video / question / start / end)")
                if span is not None:
                    lo, hi = span[0] * rate, span[1] * rate
                    if not any(lo <= f <= hi for f in picked):
                        mid = (lo + hi) / 2
                        inside = [f for f in vfiles if lo <= f <= hi]
                        if not inside:
                            raise InputError(f"no extracted frame lies in the evidence span "
                                             f"{span[0]:g}-{span[1]:g} s")
                        best = min(inside, key=lambda f: abs(f - mid))
                        near = min(range(len(picked)), key=lambda i: abs(picked[i] - mid))
                        picked = sorted(set(picked[:near] + [best] + picked[near + 1:]))
                frames = _read_frames(vfiles, picked, f"video {name}")
                video = Video(frames, fps=rate, frame_indices=picked,
                              total_frames=max(vfiles) + 1)
                if span is None:
                    a, b = 0, len(picked)
                else:
                    hit = [i for i, f in enumerate(picked) if lo <= f <= hi]
                    a, b = hit[0], hit[-1] + 1
                w, h = video.size
                bx = (0.0, 0.0, float(w), float(h)) if box is None else box
                meta = {"dataset": "mlvu", "task": path.stem, "video": name,
                        "question": question, "candidates": cands, "answer_text": answer,
                        "question_type": rec.get("question_type"), "frame_indices": picked,
                        "evidence_source": source,
                        "evidence_seconds": list(span) if span else None}
                ex = GroundedExample(
                    [], template.format(question=question, options=options),
                    letters[cands.index(answer)], [Evidence.in_frames(0, (a, b), bx)],
                    id=ex_id, metadata=meta, videos=[video]).validate()
            except InputError as e:
                _skip_or_raise(_fail(f"{path.name} record {n} (id {ex_id!r})", e, ex_id),
                               skip_invalid)
                continue
            out.append(ex)
    return out


# ----------------------------------------------------------------------------------- MMDocIR

#: MMDocIR question template (``{question}``: the annotation's ``Q``); the answer is ``A``.
MMDOCIR_TEMPLATE = "{question}"


def load_mmdocir(annotations: str | os.PathLike[str], pages_dir: str | os.PathLike[str], *,
                 extra_pages: int = 2, max_pages: int | None = None,
                 template: str = MMDOCIR_TEMPLATE,
                 page_path: Callable[[str, int], str | os.PathLike[str]] | None = None,
                 skip_invalid: bool = False, limit: int | None = None,
                 load_images: bool = True) -> list[GroundedExample]:
    """Load MMDocIR (Dong et al. 2025) questions as multi-page grounded examples.

    ``annotations``: ``MMDocIR_annotations.jsonl``, one document per line: ``doc_name``,
    ``domain``, ``page_indices`` (its first / last row in ``MMDocIR_pages.parquet``, so the
    document has ``last - first + 1`` pages) and ``questions`` of ``{Q, A, page_id: [0-based
    pages], type, layout_mapping: [{page, page_size: [w, h], bbox: [x1, y1, x2, y2]}]}``.
    ``pages_dir``: the page screenshots, ``pages_dir/<doc_name without .pdf>/<page>.png``
    (``.jpg``/``.jpeg`` too; 0-based page numbers), or any layout via ``page_path(doc_name,
    page) -> path``.

    Per question one example, id ``"{doc_name}:{k}"``: the images are the evidence pages (those
    of ``page_id`` and ``layout_mapping``) plus ``extra_pages`` other pages of the document
    (the nearest to the evidence, earlier first on ties), in document order; each
    ``layout_mapping`` box becomes ``Evidence.on_page`` on its page's image, scaled from
    ``page_size`` to the screenshot's pixels; an evidence page with no layout box is evidence
    as a whole. More than ``max_pages`` pages is an error (skipped with ``skip_invalid``).
    """
    path = Path(annotations)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    root = Path(pages_dir)
    images = _Images(decode=load_images)

    def locate(doc: str, page: int) -> Path:
        if page_path is not None:
            return Path(page_path(doc, page))
        stem = doc[:-4] if doc.lower().endswith(".pdf") else doc
        for ext in (".png", ".jpg", ".jpeg"):
            p = root / stem / f"{page}{ext}"
            if p.is_file():
                return p
        return root / stem / f"{page}.png"

    out: list[GroundedExample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                try:
                    doc = json.loads(line)
                    name, questions = str(doc["doc_name"]), doc["questions"]
                    first, last = (int(v) for v in doc["page_indices"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise InputError(f"not an MMDocIR document line: {e!r}") from None
                n_pages = last - first + 1
                where += f" ({name})"
            except InputError as e:
                _skip_or_raise(_fail(where, e), skip_invalid)
                continue
            for k, q in enumerate(questions):
                if limit is not None and len(out) >= limit:
                    break
                ex_id = f"{name}:{k}"
                try:
                    try:
                        layouts = [(int(m["page"]), m["page_size"], m["bbox"])
                                   for m in q.get("layout_mapping") or []]
                        ev_pages = sorted({int(p) for p in q.get("page_id") or []}
                                          | {p for p, _, _ in layouts})
                        question, answer = str(q["Q"]).strip(), str(q["A"]).strip()
                    except (KeyError, TypeError, ValueError) as e:
                        raise InputError(f"malformed question: {e!r}") from None
                    if not ev_pages:
                        raise InputError("the question names no evidence page")
                    bad = [p for p in ev_pages if not 0 <= p < n_pages]
                    if bad:
                        raise InputError(f"evidence page(s) {bad} outside the document's "
                                         f"{n_pages} pages (0-based)")
                    others = sorted((p for p in range(n_pages) if p not in ev_pages),
                                    key=lambda p: (min(abs(p - e) for e in ev_pages), p))
                    pages = sorted(ev_pages + others[:max(extra_pages, 0)])
                    if max_pages is not None and len(pages) > max_pages:
                        raise InputError(f"{len(pages)} pages (evidence {ev_pages} + "
                                         f"{extra_pages} extra) exceed max_pages={max_pages}")
                    ims = [images.get(locate(name, p), f"{name} page {p}") for p in pages]
                    boxes = []
                    for p, size, bbox in layouts:
                        i = pages.index(p)
                        if not (isinstance(size, (list, tuple)) and len(size) == 2
                                and all(_number(v) and v > 0 for v in size)):
                            raise InputError(f"page {p}: page_size must be [w, h], got {size!r}")
                        boxes.append(Evidence.on_page(i, _scale_box(
                            bbox, (float(size[0]), float(size[1])), ims[i].size,
                            f"page {p} layout box")))
                    for p in ev_pages:
                        if p not in {lp for lp, _, _ in layouts}:
                            i = pages.index(p)
                            w, h = ims[i].size
                            boxes.append(Evidence.on_page(i, (0, 0, w, h)))
                    meta = {"dataset": "mmdocir", "doc_name": name, "domain": doc.get("domain"),
                            "type": q.get("type"), "pages": pages, "evidence_pages": ev_pages}
                    ex = GroundedExample(ims, template.format(question=question), answer, boxes,
                                         id=ex_id, metadata=meta).validate()
                except InputError as e:
                    _skip_or_raise(_fail(f"{where} (id {ex_id!r})", e, ex_id), skip_invalid)
                    continue
                out.append(ex)
    return out
