"""Token labels that say what each token is, and groups that collapse long vision spans.

Labels: text tokens as text (the tokenizer's word-start marks turned into spaces), image
tokens ``<img 0:r3,c5>`` (``<img 0:r3,c5,base>`` where an image has several views), video
tokens ``<vid 0:f2-3,1-1.5s,r3,c5>`` (the frames the token sees and, when the fps is known, the
seconds of the first and last of them), the structural rows between them ``<img 0:nl>`` /
``<vid 0:nl>``. Groups (``collapse``): ``"row"`` puts each grid row's vision tokens (and the
newline after it) in one group ``<img 0:r3 x8>`` (per frame span for a video:
``<vid 0:f2-3,1-1.5s,r3 x8>``); ``"region"`` puts them in evidence / each distractor / other
vision tokens (``<evidence x12>``...); text tokens stay one per group. Groups are listed in the
order of their first position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from corelens.data.batch import MultimodalBatch
from corelens.data.layout import KIND_VISION, span_label
from corelens.errors import InputError

Collapse = Literal["row", "region"] | None
_SPACE_MARKS = {"\u2581": " ", "\u0120": " ", "\u010a": "\n", "\u0109": "\t"}


@dataclass
class TokenGroup:
    """Sequence positions shown as one token of a view."""

    label: str
    positions: list[int]

    @property
    def first(self) -> int:
        return self.positions[0]


def _text(tok: str) -> str:
    for mark, char in _SPACE_MARKS.items():
        tok = tok.replace(mark, char)
    return tok


def token_labels(model: Any, batch: MultimodalBatch, example: int = 0) -> list[str]:
    """One label per sequence position of ``example`` (padding positions get ``""``)."""
    mask = batch.attention_mask[example].bool().cpu()
    valid = mask.nonzero().flatten().tolist()
    toks = model.to_str_tokens(batch, example)
    if len(toks) == len(mask):
        toks = [toks[p] for p in valid]
    labels = [""] * len(mask)
    for p, t in zip(valid, toks):
        labels[p] = t if t.startswith(("<img ", "<vid ")) else _text(t)
    return labels


def valid_positions(batch: MultimodalBatch, example: int) -> list[int]:
    return batch.attention_mask[example].bool().cpu().nonzero().flatten().tolist()


def token_groups(model: Any, batch: MultimodalBatch, example: int = 0,
                 collapse: Collapse = None) -> list[TokenGroup]:
    """The tokens of ``example`` (padding dropped), vision tokens collapsed per ``collapse``."""
    labels = token_labels(model, batch, example)
    if collapse not in (None, "row", "region"):
        raise InputError(f"collapse must be None, 'row' or 'region', not {collapse!r}")
    key_of: dict[int, tuple[str, str]] = {}  # position -> (group key, group label stem)
    layout = batch.layout
    if collapse == "row":
        for img in layout.images[example]:
            rows, prev, i = img.rows, None, img.image_index
            multi = len(rows.views) > 1
            tag = "vid" if img.is_video else "img"
            for j, p in enumerate(img.positions.tolist()):
                if rows.kind[j] == KIND_VISION:
                    v = int(rows.view[j])
                    geom, r = rows.views[v], int(rows.row[j])
                    if img.is_video:
                        stem = f"<vid {i}:{span_label(geom.frames or (0, 1), geom.times)},r{r}"
                    else:
                        stem = f"<img {i}:r{r}" + (f",{geom.name}" if multi else "")
                    prev = (f"{tag}{i}/{v}/{r}", stem)
                key_of[p] = prev or (f"{tag}{i}/nl", f"<{tag} {i}:nl")
    elif collapse == "region":
        taken: set[int] = set()
        if batch.boxes and batch.boxes[example]:
            for p in batch.evidence_positions(example).tolist():
                key_of[p] = ("evidence", "<evidence")
                taken.add(p)
        for i, d in enumerate(batch.distractor_positions(example)):
            for p in d.tolist():
                if p not in taken:
                    key_of[p] = (f"distractor {i}", f"<distractor {i}")
                    taken.add(p)
        for img in layout.images[example]:
            for p in img.positions.tolist():
                key_of.setdefault(p, ("other", "<other vision"))
    groups: list[TokenGroup] = []
    index: dict[str, TokenGroup] = {}
    stems: dict[str, str] = {}
    for p in valid_positions(batch, example):
        hit = key_of.get(p)
        if hit is None:
            groups.append(TokenGroup(labels[p], [p]))
            continue
        key, stem = hit
        if key not in index:
            index[key] = TokenGroup("", [])
            stems[key] = stem
            groups.append(index[key])
        index[key].positions.append(p)
    for key, g in index.items():
        g.label = f"{stems[key]} x{len(g.positions)}>"
    return groups


def group_matrix(groups: list[TokenGroup], seq_len: int) -> torch.Tensor:
    """[n_groups, seq_len] 0/1 membership matrix."""
    m = torch.zeros(len(groups), seq_len)
    for i, g in enumerate(groups):
        m[i, g.positions] = 1.0
    return m


def resolve_queries(batch: MultimodalBatch, example: int,
                    query_positions: str | Tensor | list[int] | None) -> Int[Tensor, " q"] | None:
    """``None`` (every position), ``"query"`` (the batch's answer-predicting positions),
    ``"last"`` (the last prompt position) or explicit positions of ``example``."""
    if query_positions is None:
        return None
    if isinstance(query_positions, str):
        if query_positions == "query":
            return batch.query_positions[example].cpu().long()
        if query_positions == "last":
            return batch.last_prompt_positions[example:example + 1].cpu().long()
        raise InputError(f"query_positions must be None, 'query', 'last' or positions, "
                         f"not {query_positions!r}")
    q = torch.as_tensor(query_positions, dtype=torch.long).flatten().cpu()
    if q.numel() and (q.min() < 0 or q.max() >= batch.seq_len):
        raise InputError(f"query positions {q.tolist()} outside 0..{batch.seq_len - 1}")
    return q
