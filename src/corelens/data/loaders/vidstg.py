"""VidSTG (questions / captions about an object, its VidOR box track as evidence).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from corelens.data.examples import Box, Evidence, GroundedExample, Video
from corelens.data.loaders.common import (
    frame_files,
    load_json,
    located_error,
    read_frames,
    sample_frames,
    scale_box,
    skip_or_raise,
)
from corelens.errors import InputError

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
    records = load_json(ann_path, "VidSTG annotations")
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
                vidor_cache[vid] = load_json(vidor_files[vid], "VidOR annotation")
            trajectories = vidor_cache[vid].get("trajectories")
            if not isinstance(trajectories, list):
                raise InputError(f"{vidor_files[vid].name} has no 'trajectories' list")
            files = frame_files(Path(frames_dir) / vid, frame_offset)
            picked = sample_frames(files, num_frames, int(seg["begin_fid"]), int(seg["end_fid"]))
            frames = read_frames(files, picked, f"video {vid}")
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
                            boxes[i] = scale_box(
                                [bb["xmin"], bb["ymin"], bb["xmax"], bb["ymax"]], size,
                                video.size, f"{vidor_files[vid].name} frame {f} tid {tid}")
                return boxes
        except InputError as e:
            skip_or_raise(located_error(where, e), skip_invalid)
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
                skip_or_raise(located_error(f"{where} (id {ex_id!r})", e, ex_id), skip_invalid)
                continue
            out.append(ex)
    return out
