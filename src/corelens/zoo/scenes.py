"""Synthetic grounded scenes: shapes of colours in the cells of a grid, and questions about one.

A scene is an image (or several) of ``grid x grid`` cells on a plain background; some cells hold
one object (a shape of a colour). A question needs exactly one object, the evidence; the other
objects are distractors. Every example is deterministic from ``(task, seed)``.

Question types (the key word is the prompt's LAST word, so the position that predicts the
answer is the one holding the query — the lever that made content retrieval learnable):

- ``shape``:    "what color is the <shape>"         -> colour (the shape is unique in the scene)
- ``color``:    "which shape is <color>"            -> shape  (the colour is unique)
- ``position``: "what color is at row <r> col <c>"  -> colour
- ``relation``: "what color is <left of|right of|above|below> the <shape>" -> colour of the
  object in the neighbouring cell (which must be occupied)

``question_weights`` mixes the types unevenly; ``relations`` restricts the relation words;
``distractor_pairs`` = k draws relation scenes in which exactly k objects other than the anchor
have an occupied neighbour in the question's direction (None: the other objects fall where
they may), so "the colour next to any object" is not the answer.

Sizes: ``image_size`` pixels square; with patch size p the model sees ``(image_size / p) ** 2``
vision tokens per image, e.g. 32 px / 8 = 16 tokens, 64 / 8 = 64, 256 / 8 = 1,024.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw

from corelens.data.examples import GroundedExample
from corelens.errors import InputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "white": (250, 250, 250),
    "purple": (160, 40, 200),
    "orange": (255, 140, 0),
    "cyan": (30, 220, 230),
}
SHAPES = ("square", "circle", "triangle", "cross", "diamond", "ring")
QUESTION_TYPES = ("shape", "color", "position", "relation")
RELATIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


@dataclass
class SceneTask:
    """What scenes and questions to draw.

    ``n_objects`` is the (min, max) number of objects per scene (over all images of a
    multi-image example); a curriculum raises it during training. ``n_images`` > 1 spreads the
    objects over several images: the evidence lies in one of them.
    """

    image_size: int = 64
    grid: int = 4
    n_objects: tuple[int, int] = (2, 5)
    question_types: tuple[str, ...] = ("shape",)
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
    shapes: tuple[str, ...] = ("square", "circle", "triangle", "cross")
    n_images: int = 1
    background: tuple[int, int, int] = (0, 0, 0)
    margin: float = 0.125  # empty border of a cell, as a fraction of the cell
    question_weights: tuple[float, ...] | None = None  # per question type (None: uniform)
    relations: tuple[str, ...] = tuple(RELATIONS)
    distractor_pairs: int | None = None

    def __post_init__(self) -> None:
        self.n_objects = tuple(self.n_objects)  # type: ignore[assignment]
        self.question_types = tuple(self.question_types)
        self.relations = tuple(self.relations)
        if self.question_weights is not None:
            self.question_weights = tuple(self.question_weights)
            if len(self.question_weights) != len(self.question_types):
                raise ValueError(f"question_weights {self.question_weights} must give one "
                                 f"weight per question type {self.question_types}")
        if not self.relations or set(self.relations) - set(RELATIONS):
            raise ValueError(f"relations {self.relations} must be a non-empty subset of "
                             f"{tuple(RELATIONS)}")
        self.colors = tuple(self.colors)
        self.shapes = tuple(self.shapes)
        self.background = tuple(self.background)  # type: ignore[assignment]
        bad = [q for q in self.question_types if q not in QUESTION_TYPES]
        if bad:
            raise ValueError(f"unknown question type(s) {bad}; choose from {QUESTION_TYPES}")
        unknown = [c for c in self.colors if c not in COLORS] + [
            s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colour/shape name(s) {unknown}")
        lo, hi = self.n_objects
        cells = self.grid * self.grid * self.n_images
        if not 1 <= lo <= hi <= cells:
            raise ValueError(f"n_objects={self.n_objects} must satisfy 1 <= min <= max <= "
                             f"{cells} (cells)")
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not a multiple of grid "
                             f"{self.grid}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    def words(self) -> list[str]:
        """Every word a prompt or answer of this task can use (for a word-level tokenizer)."""
        w = ["what", "color", "is", "the", "which", "shape", "at", "row", "col", "of"]
        w += list(RELATION_WORDS) + ["of"]
        w += list(COLORS) + list(SHAPES) + [str(i) for i in range(10)]
        return list(dict.fromkeys(w))

    def answers(self) -> list[str]:
        """The possible answers (colours, plus shapes if the ``color`` type is asked)."""
        out = list(self.colors)
        if "color" in self.question_types:
            out += list(self.shapes)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SceneTask":
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "SceneTask":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class SceneObject:
    image: int
    row: int
    col: int
    shape: str
    color: str
    box: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               rgb: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling ``box`` = (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    xa, ya = x1 - 1, y1 - 1  # PIL's inclusive corners
    w, h = x1 - x0, y1 - y0
    if shape == "square":
        draw.rectangle([x0, y0, xa, ya], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, xa, ya], fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + xa) / 2, y0), (x0, ya), (xa, ya)], fill=rgb)
    elif shape == "cross":
        t = max(1, w // 3)
        cx0, cy0 = x0 + (w - t) // 2, y0 + (h - t) // 2
        draw.rectangle([cx0, y0, cx0 + t - 1, ya], fill=rgb)
        draw.rectangle([x0, cy0, xa, cy0 + t - 1], fill=rgb)
    elif shape == "diamond":
        cx, cy = (x0 + xa) / 2, (y0 + ya) / 2
        draw.polygon([(cx, y0), (xa, cy), (cx, ya), (x0, cy)], fill=rgb)
    elif shape == "ring":
        draw.ellipse([x0, y0, xa, ya], outline=rgb, width=max(1, w // 5))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(task: SceneTask, rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    cells = [(i, r, c) for i in range(task.n_images) for r in range(task.grid)
             for c in range(task.grid)]
    return rng.sample(cells, n)


def _box(task: SceneTask, r: int, c: int) -> tuple[int, int, int, int]:
    s = task.cell
    m = max(1, round(s * task.margin))
    return (c * s + m, r * s + m, (c + 1) * s - m, (r + 1) * s - m)


def make_example(task: SceneTask, seed: int, qtype: str | None = None) -> GroundedExample:
    """One example, deterministic from ``(task, seed)``."""
    rng = random.Random(f"corelens-scene-{seed}")
    if qtype is None:
        qtype = (rng.choice(task.question_types) if task.question_weights is None
                 else rng.choices(task.question_types, weights=task.question_weights)[0])
    n = rng.randint(*task.n_objects)
    if qtype == "relation":
        n = max(n, 2 + (task.distractor_pairs or 0))
    for _attempt in range(1000):
        objs = _draw_objects(task, rng, n, qtype)
        if objs is not None:
            break
    else:  # pragma: no cover - the constraints are always satisfiable
        raise RuntimeError(f"could not draw a {qtype!r} scene with {n} objects")
    objects, target, question, answer = objs

    images = [Image.new("RGB", (task.image_size, task.image_size), task.background)
              for _ in range(task.n_images)]
    draws = [ImageDraw.Draw(im) for im in images]
    for o in objects:
        draw_shape(draws[o.image], o.shape, o.box, COLORS[o.color])
    if task.n_images > 1:
        question = " ".join(["<image>"] * task.n_images) + " " + question
    return GroundedExample(
        images=images, question=question, answer=answer,
        boxes=[(target.image, o_box(target))],
        distractors=[(o.image, o_box(o)) for o in objects if o is not target],
        id=f"scene-{seed}",
        metadata={"qtype": qtype, "seed": seed, "n_objects": len(objects),
                  "target": asdict(target), "objects": [asdict(o) for o in objects]},
    )


def o_box(o: SceneObject) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in o.box)  # type: ignore[return-value]


def _draw_objects(task: SceneTask, rng: random.Random, n: int, qtype: str) -> Any:
    places = _place(task, rng, n)
    ti = 0  # the target is the first placed object
    if qtype == "shape":
        tshape = rng.choice(task.shapes)
        others = [s for s in task.shapes if s != tshape]
        shapes = [tshape] + [rng.choice(others) for _ in range(n - 1)]
        colors = [rng.choice(task.colors) for _ in range(n)]
    elif qtype == "color":
        tcolor = rng.choice(task.colors)
        others = [c for c in task.colors if c != tcolor]
        colors = [tcolor] + [rng.choice(others) for _ in range(n - 1)]
        shapes = [rng.choice(task.shapes) for _ in range(n)]
    elif qtype == "position":
        shapes = [rng.choice(task.shapes) for _ in range(n)]
        colors = [rng.choice(task.colors) for _ in range(n)]
        if task.n_images > 1:
            raise ValueError("position questions need a single image (rows/cols are per image)")
    else:  # relation: "what color is <rel> the <shape>" -> the neighbour of the anchor
        rel = rng.choice(task.relations)
        dr, dc = RELATIONS[rel]
        i, r, c = places[0]
        ar, ac = r - dr, c - dc  # the anchor sits on the other side of the target
        if not (0 <= ar < task.grid and 0 <= ac < task.grid):
            return None
        anchor = (i, ar, ac)
        places = [places[0], anchor] + [p for p in places[1:] if p != anchor][: n - 2]
        ashape = rng.choice(task.shapes)
        others = [s for s in task.shapes if s != ashape]
        shapes = [rng.choice(others), ashape] + [rng.choice(others) for _ in range(n - 2)]
        colors = [rng.choice(task.colors) for _ in range(len(places))]
    objects = [SceneObject(i, r, c, s, col, _box(task, r, c))
               for (i, r, c), s, col in zip(places, shapes, colors)]
    if (qtype == "relation" and task.distractor_pairs is not None
            and _other_pairs(objects, RELATIONS[rel]) != task.distractor_pairs):
        return None
    target = objects[ti]
    if qtype == "shape":
        question, answer = f"what color is the {target.shape}", target.color
    elif qtype == "color":
        question, answer = f"which shape is {target.color}", target.shape
    elif qtype == "position":
        question, answer = f"what color is at row {target.row} col {target.col}", target.color
    else:
        question = f"what color is {RELATION_WORDS[rel]} the {objects[1].shape}"
        answer = target.color
    return objects, target, question, answer


def _other_pairs(objects: list[SceneObject], step: tuple[int, int]) -> int:
    """How many objects other than the anchor (``objects[1]``) have an occupied cell at
    ``step`` from them: the distractor pairs of a relation scene."""
    cells = {(o.image, o.row, o.col) for o in objects}
    dr, dc = step
    return sum((o.image, o.row + dr, o.col + dc) in cells for o in objects[:1] + objects[2:])


# Example seeds in [TRAIN_SEEDS_START, TRAIN_SEEDS_END) are reserved for training streams: every
# training example of corelens.zoo.train is drawn there, and make_examples / iter_examples (the
# scoring and evaluation sets) refuse any seed that reaches into it.
TRAIN_SEEDS_START = 1_000_000_000
TRAIN_SEEDS_END = 2_000_000_000
SEED_STRIDE = 1_000_003  # example i of set ``seed`` is make_example(task, seed * SEED_STRIDE + i)


def check_held_out(seed: int, n: int) -> None:
    """Refuse a set whose example seeds ``seed * SEED_STRIDE + [0, n)`` can collide with a
    training stream, naming the seeds that are safe for ``n`` examples."""
    lo, hi = seed * SEED_STRIDE, seed * SEED_STRIDE + n
    if seed < 0 or (lo < TRAIN_SEEDS_END and hi > TRAIN_SEEDS_START):
        below = (TRAIN_SEEDS_START - n) // SEED_STRIDE
        above = -(-TRAIN_SEEDS_END // SEED_STRIDE)
        raise InputError(
            f"seed {seed} with n={n} draws example seeds {lo:,}..{hi - 1:,}, which reach into "
            f"the range reserved for training streams [{TRAIN_SEEDS_START:,}, "
            f"{TRAIN_SEEDS_END:,}): a toy model may have trained on these examples. Held-out "
            f"seeds for n={n}: 0..{below} or >= {above:,}")


def make_examples(task: SceneTask, n: int, seed: int = 0) -> list[GroundedExample]:
    """``n`` held-out examples; example ``i`` is ``make_example(task, seed * SEED_STRIDE + i)``.
    Sets of different seeds are disjoint for ``n < SEED_STRIDE``; a seed whose examples reach
    into the training streams' range is refused (``check_held_out``)."""
    check_held_out(seed, n)
    return [make_example(task, seed * SEED_STRIDE + i) for i in range(n)]


def iter_examples(task: SceneTask, seed: int = 0) -> Iterator[GroundedExample]:
    """Held-out examples of set ``seed``, endlessly (refused where they would reach the
    training streams' range)."""
    i = 0
    while True:
        check_held_out(seed, i + 1)
        yield make_example(task, seed * SEED_STRIDE + i)
        i += 1


def blank_like(ex: GroundedExample, background: tuple[int, int, int] = (0, 0, 0)
               ) -> GroundedExample:
    """The same question with every image replaced by a blank one (boxes kept)."""
    ims = [Image.new("RGB", im.size, background) for im in ex.images]
    return GroundedExample(ims, ex.question, ex.answer, list(ex.boxes), list(ex.distractors),
                           id=f"{ex.id}-blank", metadata=dict(ex.metadata))


def swap_images(examples: list[GroundedExample]) -> list[GroundedExample]:
    """Each question paired with the next example's images (a rotation)."""
    n = len(examples)
    return [GroundedExample(examples[(i + 1) % n].images, ex.question, ex.answer,
                            list(examples[(i + 1) % n].boxes), [], id=f"{ex.id}-swapped",
                            metadata=dict(ex.metadata))
            for i, ex in enumerate(examples)]


def recolor_target(ex: GroundedExample, color: str,
                   background: tuple[int, int, int] = (0, 0, 0)) -> GroundedExample:
    """The same scene and question with the queried object redrawn in ``color``: a corrupted
    partner whose layout matches ``ex`` exactly (for activation and path patching)."""
    target = ex.metadata["target"]
    images = [im.copy() for im in ex.images]
    draw = ImageDraw.Draw(images[target["image"]])
    x0, y0, x1, y1 = target["box"]
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=background)
    draw_shape(draw, target["shape"], tuple(target["box"]), COLORS[color])
    meta = {**ex.metadata, "target": {**target, "color": color}}
    return GroundedExample(images, ex.question, color, list(ex.boxes), list(ex.distractors),
                           id=f"{ex.id}-recolored-{color}", metadata=meta)
