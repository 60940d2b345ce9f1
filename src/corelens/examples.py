"""``GroundedExample``: image(s), a question, its answer, and where the evidence is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from corelens.errors import InputError

Box = tuple[float, float, float, float]


@dataclass
class GroundedExample:
    """One grounded question.

    ``boxes`` are the evidence regions and ``distractors`` other objects that are not the
    evidence, each as ``(image_index, (x0, y0, x1, y1))`` in original-image pixels, x1/y1
    exclusive.
    """

    images: list[Image.Image]
    question: str
    answer: str
    boxes: list[tuple[int, Box]]
    distractors: list[tuple[int, Box]] = field(default_factory=list)
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.images, Image.Image):
            self.images = [self.images]
        self.boxes = [_entry(b) for b in self.boxes]
        self.distractors = [_entry(b) for b in self.distractors]

    def validate(self) -> "GroundedExample":
        """Raise an ``InputError`` naming the example if anything is off."""
        name = f"example {self.id!r}" if self.id is not None else "example"
        if not self.images:
            raise InputError(f"{name}: no image")
        if not str(self.answer).strip():
            raise InputError(f"{name}: the answer is empty")
        if not str(self.question).strip():
            raise InputError(f"{name}: the question is empty")
        if not self.boxes:
            raise InputError(f"{name}: no evidence box")
        for kind, entries in (("evidence", self.boxes), ("distractor", self.distractors)):
            for img, (x0, y0, x1, y1) in entries:
                if not 0 <= img < len(self.images):
                    raise InputError(f"{name}: {kind} box refers to image {img}, but the example "
                                     f"has {len(self.images)} image(s)")
                w, h = self.images[img].size
                if not (x0 < x1 and y0 < y1):
                    raise InputError(f"{name}: {kind} box {(x0, y0, x1, y1)} is empty")
                if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                    raise InputError(f"{name}: {kind} box {(x0, y0, x1, y1)} lies outside image "
                                     f"{img} of size {w}x{h}")
        return self


def _entry(b: Any) -> tuple[int, Box]:
    """Accept ``(x0, y0, x1, y1)`` (image 0) or ``(image, (x0, y0, x1, y1))``."""
    if len(b) == 4 and all(isinstance(v, (int, float)) for v in b):
        return 0, tuple(float(v) for v in b)  # type: ignore[return-value]
    img, box = b
    return int(img), tuple(float(v) for v in box)  # type: ignore[return-value]
