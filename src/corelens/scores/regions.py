"""The position sets a head score is measured on: queries Q_e, evidence R_e, vision V_e,
distractors, the sink, and the token grids of the first view; and ``key_weights``, the weight
of each key in the value-weighted scores.

They are built from ``MultimodalBatch.evidence_positions`` / ``distractor_positions`` and the
``VisionLayout``: the same definitions patching's ``position_groups`` and the views use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from corelens.core.attention import AttentionInputs
from corelens.data.batch import MultimodalBatch


@dataclass(frozen=True)
class RamParams:
    """The definition's free parameters (all recorded in every ``HeadScores``)."""

    tau: float = 0.5  # min fraction of a token's area inside the evidence to count it in R_e
    query: str = "answer"  # "answer" | "last_prompt"
    mass_floor: float = 0.02  # min mean visual mass for a head to get ratio scores
    value_weighted: bool = False  # also compute mass weighted by |v W_O| of each key
    exclude_sink: bool = False  # renormalise rows without the sink tokens' mass
    high_norm_factor: float = 10.0  # a vision token whose layer-input norm exceeds this x the
    #                                 median vision-token norm is a high-norm (sink) token
    kang_entropy: bool = False  # also compute kang_spatial_entropy (a connected-components
    #                             pass per head and query row: off, RAM costs about a forward)


#: one token grid: (positions, rows, cols, n_rows, n_cols)
Grid = tuple[Tensor, Tensor, Tensor, int, int]


@dataclass
class ExampleRegions:
    """Position sets of one example (indexes into the padded sequence)."""

    queries: Int[Tensor, " q"]
    evidence: Int[Tensor, " r"]
    vision: Int[Tensor, " v"]
    distractors: list[Int[Tensor, " d"]]
    sink: int  # first real token
    # token grids for kang_spatial_entropy: the first image's first view, or -- for an example
    # with videos and no image -- one grid per frame span of that video (``first_view_grids``);
    # None: the score is not asked for (``RamParams.kang_entropy``)
    grids: list[Grid] | None = field(default_factory=list)


def example_regions(batch: MultimodalBatch, params: RamParams) -> list[ExampleRegions]:
    """The regions of every example of ``batch`` under ``params`` (tau, query)."""
    out = []
    for e in range(len(batch)):
        if params.query == "answer":
            q = batch.query_positions[e]
        elif params.query == "last_prompt":
            q = batch.query_positions[e][:1]
        else:
            raise ValueError(f"query must be 'answer' or 'last_prompt', not {params.query!r}")
        first = int(batch.attention_mask[e].float().argmax())
        out.append(ExampleRegions(q.cpu(), batch.evidence_positions(e, tau=params.tau).cpu(),
                                  batch.layout.vision_positions(e).cpu(),
                                  [d.cpu() for d in batch.distractor_positions(e, params.tau)],
                                  first, first_view_grids(batch, e) if params.kang_entropy
                                  else None))
    return out


def first_view_grids(batch: MultimodalBatch, e: int) -> list[Grid]:
    """The token grids ``kang_spatial_entropy`` reads: the first view of the example's first
    image (anyres tiles and other images are left out), or, when the example has videos and
    no image, every frame span of its first video (each span is one frame -- LLaVA-OneVision --
    or two -- Qwen's temporal patch -- seen as its own grid; the score weighs their entropies
    by the attention mass on each span)."""
    if not batch.layout.images[e]:
        return []
    img = batch.layout.images[e][0]
    out = []
    for v, view in enumerate(img.rows.views if img.is_video else img.rows.views[:1]):
        sel = (img.rows.kind == 0) & (img.rows.view == v)
        if sel.any():
            out.append((img.positions[sel].cpu(), img.rows.row[sel], img.rows.col[sel],
                        view.rows, view.cols))
    return out


def key_weights(model: Any, inputs: AttentionInputs) -> Float[Tensor, "batch head key"]:
    """|v_k W_O^h|: the norm of what key k writes through head h (``RamParams.value_weighted``
    weighs each key's attention by it, after Kobayashi et al. 2020)."""
    attn = model.attention.layers[inputs.layer]
    w_o = attn.o.original_component.weight  # [d_model, heads * d_head]
    h, d = inputs.q.shape[1], inputs.q.shape[3]
    w_o = w_o.view(w_o.shape[0], h, d).permute(1, 2, 0)  # [head, d_head, d_model]
    v = inputs.v.repeat_interleave(inputs.n_rep, dim=1) if inputs.n_rep > 1 else inputs.v
    return torch.einsum("bhkd,hdm->bhkm", v.to(w_o.dtype), w_o).norm(dim=-1).float()
