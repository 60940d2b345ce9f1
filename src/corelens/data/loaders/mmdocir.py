"""MMDocIR multi-page document questions (evidence: layout boxes on pages).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from corelens.data.examples import Evidence, GroundedExample
from corelens.data.loaders.common import (
    ImageCache,
    is_number,
    located_error,
    scale_box,
    skip_or_raise,
)
from corelens.errors import InputError

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
    images = ImageCache(decode=load_images)

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
                skip_or_raise(located_error(where, e), skip_invalid)
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
                                and all(is_number(v) and v > 0 for v in size)):
                            raise InputError(f"page {p}: page_size must be [w, h], got {size!r}")
                        boxes.append(Evidence.on_page(i, scale_box(
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
                    skip_or_raise(located_error(f"{where} (id {ex_id!r})", e, ex_id), skip_invalid)
                    continue
                out.append(ex)
    return out
