"""RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout (``refs(<split_by>).p`` +
``instances.json``) as grounded questions.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from corelens.data.examples import Box, GroundedExample
from corelens.data.loaders.common import (
    EDGE_TOLERANCE,
    ImageCache,
    is_number,
    located_error,
    skip_or_raise,
)
from corelens.errors import InputError

# ---------------------------------------------------------------------------------- RefCOCO

#: Default RefCOCO question. Fields: ``{sentence}`` (the referring expression, trailing period
#: removed), ``{category}``, ``{supercategory}``; the default answer is ``{category}``, so the
#: model has to find the described object to name it.
REFCOCO_TEMPLATE = 'Which object does "{sentence}" refer to? Answer with its category name.'

_DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


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

    Example:
        ```python
        from corelens import load_refcoco

        # data/refer/refcocog/refs(umd).p, data/refer/refcocog/instances.json, data/refer/images/
        examples = load_refcoco("data/refer", dataset="refcocog", split="val", limit=100)
        examples[0].question, examples[0].answer, examples[0].boxes[0]
        ```
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
    images = ImageCache(decode=load_images)
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
            skip_or_raise(located_error(f"{source} ref {ref_id} (ids {ids})", e), skip_invalid)
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
                skip_or_raise(located_error(f"{source} ref {ref_id} (id {ex_id!r})", e, ex_id),
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
               by_image: dict[Any, list[dict[str, Any]]], images: ImageCache, img_dir: Path,
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
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise InputError(f"annotation {ann.get('id')}: bbox must be [x, y, w, h], got {bbox!r}")
    w, h = size
    x0, y0 = float(bbox[0]), float(bbox[1])
    x1, y1 = x0 + float(bbox[2]), y0 + float(bbox[3])
    if -EDGE_TOLERANCE < x0 < 0:
        x0 = 0.0
    if -EDGE_TOLERANCE < y0 < 0:
        y0 = 0.0
    if w < x1 < w + EDGE_TOLERANCE:
        x1 = float(w)
    if h < y1 < h + EDGE_TOLERANCE:
        y1 = float(h)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"annotation {ann.get('id')}: box {(x0, y0, x1, y1)} (bbox {bbox}) is "
                         f"empty or outside the {w}x{h} image")
    return x0, y0, x1, y1
