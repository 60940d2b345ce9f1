"""Grounded-data loaders: corelens's JSONL format, RefCOCO / RefCOCO+ / RefCOCOg, and the
video / document benchmarks VidSTG, MLVU and MMDocIR (frames and pages from local files).

Every loader returns validated ``GroundedExample``s. A problem with one example is an
``InputError`` naming the file, the line (JSONL), ref (RefCOCO) or record and the example id; with
``skip_invalid=True`` that example is skipped with one warning instead and every valid example
is still returned, in file order. The formats are described in ``docs/data.md``.

One module per format (``jsonl``, ``refcoco``, ``vidstg``, ``mlvu``, ``mmdocir``) and ``common``
for what they share (error handling, image opening, video frames on disk).
"""

from __future__ import annotations

from corelens.data.loaders.common import frame_files, sample_frames
from corelens.data.loaders.jsonl import load_jsonl, save_jsonl
from corelens.data.loaders.mlvu import MLVU_TEMPLATE, load_mlvu
from corelens.data.loaders.mmdocir import MMDOCIR_TEMPLATE, load_mmdocir
from corelens.data.loaders.refcoco import REFCOCO_TEMPLATE, load_refcoco
from corelens.data.loaders.vidstg import (
    VIDSTG_CAPTION_TEMPLATE,
    VIDSTG_QUESTION_TEMPLATE,
    load_vidstg,
    vidstg_answer,
)

__all__ = ["MLVU_TEMPLATE", "MMDOCIR_TEMPLATE", "REFCOCO_TEMPLATE", "VIDSTG_CAPTION_TEMPLATE",
           "VIDSTG_QUESTION_TEMPLATE", "frame_files", "load_jsonl", "load_mlvu", "load_mmdocir",
           "load_refcoco", "load_vidstg", "sample_frames", "save_jsonl", "vidstg_answer"]
