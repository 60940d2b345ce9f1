"""``MultimodalBatch``: model inputs, where the vision tokens are, and which positions to read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from corelens.data.layout import VisionLayout
from corelens.errors import InputError

Box = tuple[float, float, float, float]


@dataclass
class MultimodalBatch:
    """A padded batch ready for a forward pass.

    ``inputs`` holds every tensor the model's forward takes (``input_ids``, ``attention_mask``,
    ``pixel_values``, the family's extras such as ``image_grid_thw`` / ``image_sizes``, and the
    decoder's ``position_ids``). ``query_positions[e]`` are the positions whose next token is an
    answer token of example e (teacher forcing), or the last prompt position when no answer was
    given; ``answer_tokens[e]`` are those answer token ids, aligned with them.

    Shapes: ``input_ids`` and ``attention_mask`` are ``Int[Tensor, "batch seq"]``;
    ``query_positions[e]`` and ``answer_tokens[e]`` ``Int[Tensor, "q"]``; ``layout`` (a
    ``VisionLayout``) places every vision token, ``evidence_positions(e)`` gives R_e,
    ``Int[Tensor, "r"]``.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")
        batch = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))
        batch.input_ids.shape  # [batch, seq]
        batch.query_positions[0], batch.answer_tokens[0]  # Int[Tensor, "q"] each
        batch.evidence_positions(0)  # R_e: vision tokens on the evidence box
        batch.layout.vision_positions(0)  # V_e: all 64 vision tokens of example 0
        ```
    """

    inputs: dict[str, Tensor]
    layout: VisionLayout
    query_positions: list[Int[Tensor, " q"]]
    answer_tokens: list[Int[Tensor, " q"]]
    prompts: list[str]
    images: list[list[Any]] = field(default_factory=list)
    # evidence per example: ``corelens.Evidence`` -- the pair (image, box), or a box in
    # a frame range of a video (image None; ``.video``, ``.frames``)
    boxes: list[list[tuple[int, Box]]] = field(default_factory=list)
    distractors: list[list[tuple[int, Box]]] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)  # real prompt tokens per example
    videos: list[list[Any]] = field(default_factory=list)  # ``Video``s per example
    # the image-processor settings of this call only (``prepare(..., max_pixels=...)``)
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def input_ids(self) -> Int[Tensor, "batch seq"]:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> Int[Tensor, "batch seq"]:
        return self.inputs["attention_mask"]

    @property
    def shape(self) -> torch.Size:
        """``input_ids.shape``: lets ``transformer_lens.patching`` size its sweeps."""
        return self.input_ids.shape

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def logits_to_keep(self) -> int:
        """How many final positions hold every query position (left padding puts each
        example's answer at the end): HF's ``logits_to_keep`` for a forward whose logits are
        read only there, so the unembedding runs on these positions, not the whole sequence."""
        first = min((int(q.min()) for q in self.query_positions if len(q)), default=0)
        return self.seq_len - first

    @property
    def last_prompt_positions(self) -> Int[Tensor, " batch"]:
        """The position that predicts the first answer token (or the next token)."""
        return torch.stack([q[0] for q in self.query_positions])

    def evidence_positions(self, example: int, tau: float = 0.5) -> Int[Tensor, " r"]:
        """R_e: vision tokens covering the example's evidence boxes (union over boxes)."""
        if not self.boxes or not self.boxes[example]:
            raise InputError(f"example {example} has no evidence box; pass boxes= to prepare")
        parts = [self._region(example, ev, tau) for ev in self.boxes[example]]
        return torch.unique(torch.cat(parts))

    def distractor_positions(self, example: int, tau: float = 0.5) -> list[Int[Tensor, " r"]]:
        """The vision tokens of each distractor region of the example (one tensor each)."""
        if not self.distractors:
            return []
        return [self._region(example, ev, tau) for ev in self.distractors[example]]

    def _region(self, example: int, ev: Any, tau: float) -> Int[Tensor, " r"]:
        """The tokens of one evidence entry: in its image / on its page, or -- for a frame
        range of a video -- the tokens that see one of those frames AND overlap the box by >=
        tau (a track: the union of that over its frames, each with its own box)."""
        video = getattr(ev, "video", None)
        if video is not None:
            return torch.unique(torch.cat([
                self.layout.positions_in_box(example, box, tau=tau, video=video, frames=frames)
                for frames, box in ev.parts()]))
        i, box = ev
        return self.layout.positions_in_box(example, box, image=i, tau=tau)

    def to(self, device: torch.device | str) -> "MultimodalBatch":
        return replace(self, inputs={k: v.to(device) if isinstance(v, Tensor) else v
                                     for k, v in self.inputs.items()})

    def model_kwargs(self) -> dict[str, Tensor]:
        """Everything but ``input_ids``, as keyword arguments to the forward."""
        return {k: v for k, v in self.inputs.items() if k != "input_ids"}


def repeat_batch(batch: MultimodalBatch, k: int) -> MultimodalBatch:
    """The batch stacked ``k`` times (copy i = examples ``i*B .. (i+1)*B - 1``), images and
    family extras included: one forward then runs k differently patched copies."""
    if k == 1:
        return batch
    inputs = {}
    for name, t in batch.inputs.items():
        if name == "position_ids" and t.ndim == 3:  # M-RoPE: [3, batch, seq]
            inputs[name] = t.repeat(1, k, 1)
        else:  # per example or per image (images follow example order)
            inputs[name] = t.repeat(k, *([1] * (t.ndim - 1)))
    layout = VisionLayout(batch.layout.images * k, batch.layout.seq_len)
    return replace(batch, inputs=inputs, layout=layout,
                   query_positions=batch.query_positions * k,
                   answer_tokens=batch.answer_tokens * k, prompts=batch.prompts * k,
                   images=batch.images * k, boxes=batch.boxes * k,
                   distractors=batch.distractors * k, ids=batch.ids * k,
                   videos=batch.videos * k,
                   prompt_lengths=batch.prompt_lengths * k)
