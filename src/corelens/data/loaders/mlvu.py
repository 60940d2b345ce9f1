"""MLVU multiple-choice video questions (evidence: a frame range, from a side file or the
record's own bounds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from corelens.data.examples import Evidence, GroundedExample, Video
from corelens.data.loaders.common import (
    frame_files,
    is_number,
    load_json,
    located_error,
    read_frames,
    sample_frames,
    skip_or_raise,
)
from corelens.errors import InputError

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
        records = load_json(path, "MLVU annotations")
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
                    if not is_number(dur) or dur <= 0:
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
                elif is_number(rec.get("start")) and is_number(rec.get("end")):
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
                frames = read_frames(vfiles, picked, f"video {name}")
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
                skip_or_raise(located_error(f"{path.name} record {n} (id {ex_id!r})", e, ex_id),
                               skip_invalid)
                continue
            out.append(ex)
    return out
