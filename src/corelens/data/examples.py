"""``GroundedExample``: image(s) and/or video(s), a question, its answer, and where the evidence is.

Evidence comes in three shapes (``Evidence``):

- a box in one image (``Evidence.in_image``; plain ``(image, box)`` tuples mean the same);
- a box in a frame range of a video (``Evidence.in_frames``, VidSTG / MLVU style; one frame is
  the range ``(f, f + 1)``), or a moving box -- one box per frame -- over some frames of a video
  (``Evidence.in_track``, a VidSTG object trajectory);
- a box on a page of a document, where the pages are the images of a multi-image prompt
  (``Evidence.on_page``, MMDocIR style; it selects exactly what ``in_image`` does, and records
  that the image is a page).

Boxes are ``(x0, y0, x1, y1)`` in original pixels of their image / frame, x1/y1 exclusive; frame
ranges are ``(start, end)`` over the video's given frames, end exclusive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from corelens.errors import InputError

Box = tuple[float, float, float, float]


@dataclass
class Video:
    """A video as the frames the model sees.

    ``frames``: PIL images (or one ``[T, H, W, 3]`` uint8 array / a list of ``[H, W, 3]`` arrays),
    all the same size. ``fps``: frames per second of the SOURCE video, and ``frame_indices``: each
    given frame's index in the source (default ``0, 1, ...``); with ``fps`` known, frame i was
    shown at ``frame_indices[i] / fps`` seconds (``timestamps``). ``total_frames``: the source
    length (default: the last index + 1). Processors get these as HF ``video_metadata``
    (Qwen2.5-VL derives ``second_per_grid_ts`` from them, Qwen3-VL its ``<t seconds>`` text).
    Without ``fps`` corelens reports times as unknown, but HF's processors assume 24 fps
    (Qwen2.5-VL's temporal ids, Qwen3-VL's timestamps): pass the real ``fps`` for video work.

    Example:
        ```python
        import numpy as np
        from corelens import Video

        frames = np.zeros((8, 48, 64, 3), dtype=np.uint8)  # [T, H, W, 3]
        video = Video(frames, fps=2.0, frame_indices=list(range(0, 16, 2)))
        len(video), video.size  # (8, (64, 48)): 8 frames of width 64, height 48
        video.timestamps[:3]  # [0.0, 1.0, 2.0]: source frames 0, 2, 4 at 2 fps
        ```
    """

    frames: list[Image.Image]
    fps: float | None = None
    frame_indices: list[int] | None = None
    total_frames: int | None = None

    def __post_init__(self) -> None:
        frames = self.frames
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
                raise InputError(f"a video array must be [frames, height, width, channels], got "
                                 f"shape {frames.shape}")
            frames = list(frames)
        out = []
        for i, f in enumerate(frames):
            if isinstance(f, np.ndarray):
                f = Image.fromarray(np.ascontiguousarray(f).astype(np.uint8).squeeze())
            if not isinstance(f, Image.Image):
                raise InputError(f"video frame {i} must be a PIL image or an array, got "
                                 f"{type(f).__name__}")
            out.append(f.convert("RGB"))
        if not out:
            raise InputError("a video needs at least one frame")
        sizes = {f.size for f in out}
        if len(sizes) > 1:
            raise InputError(f"all frames of a video must have one size, got {sorted(sizes)}")
        self.frames = out
        if self.frame_indices is None:
            self.frame_indices = list(range(len(out)))
        self.frame_indices = [int(i) for i in self.frame_indices]
        if len(self.frame_indices) != len(out):
            raise InputError(f"frame_indices has {len(self.frame_indices)} entries for "
                             f"{len(out)} frames")
        if any(b <= a for a, b in zip(self.frame_indices, self.frame_indices[1:])):
            raise InputError(f"frame_indices must increase: {self.frame_indices}")
        if self.fps is not None and not self.fps > 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        if self.total_frames is None:
            self.total_frames = self.frame_indices[-1] + 1

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self.frames[0].size

    @property
    def timestamps(self) -> list[float] | None:
        """Seconds at which each given frame was shown (None when ``fps`` is unknown)."""
        if self.fps is None:
            return None
        return [i / self.fps for i in self.frame_indices]  # type: ignore[union-attr]

    def array(self) -> np.ndarray:
        """The frames as one ``[T, H, W, 3]`` uint8 array (what HF video processors take)."""
        return np.stack([np.asarray(f) for f in self.frames])

    def metadata(self) -> dict[str, Any]:
        """HF ``VideoMetadata`` fields for this video.

        HF takes the sampling rate to be ``len(frames_indices) / total_num_frames * fps`` (it
        assumes frames spread evenly over the whole source; Qwen2.5-VL's
        ``second_per_grid_ts`` comes from it), which is wrong for frames from a segment or
        sparsely sampled. So ``total_num_frames`` is the length that makes that rate the
        frames' own: their count times their mean spacing (``total_frames`` for one frame)."""
        w, h = self.size
        idx = list(self.frame_indices or [])
        n = len(idx)
        span = n * (idx[-1] - idx[0]) / (n - 1) if n > 1 else self.total_frames
        if float(span).is_integer():
            span = int(span)
        return {"total_num_frames": span, "fps": self.fps, "frames_indices": idx,
                "width": w, "height": h}

    @classmethod
    def coerce(cls, v: Any) -> "Video":
        """A ``Video`` from a ``Video``, a list of frames or a ``[T, H, W, 3]`` array."""
        return v if isinstance(v, cls) else cls(v)


class Evidence(tuple):
    """Where the evidence is: a box in an image, in a frame range of a video, or on a page.

    It is the tuple ``(image, box)`` -- so code that unpacks ``(image, box)`` pairs keeps working
    -- with ``image`` None for video evidence, plus ``kind`` ("image" | "frames" | "page"),
    ``video`` and ``frames`` (``(start, end)``, end exclusive) attributes.

    Example:
        ```python
        from corelens import Evidence

        ev = Evidence.in_image(0, (10, 10, 50, 40))  # (x0, y0, x1, y1) in image 0
        image, box = ev  # still the pair: 0, (10.0, 10.0, 50.0, 40.0)
        clip = Evidence.in_frames(0, (2, 5), (0, 0, 32, 32))  # frames 2, 3, 4 of video 0
        clip.kind, clip.video, clip.frames  # ('frames', 0, (2, 5))
        Evidence.on_page(3, (0, 0, 100, 20)).kind  # 'page'
        ```
    """

    kind: str
    video: int | None
    frames: tuple[int, int] | None
    track: tuple[tuple[int, Box], ...] | None

    def __new__(cls, image: int | None, box: Sequence[float], *, kind: str = "image",
                video: int | None = None, frames: tuple[int, int] | None = None,
                track: Sequence[tuple[int, Sequence[float]]] | None = None) -> "Evidence":
        if len(box) != 4:
            raise InputError(f"a box needs 4 numbers (x0, y0, x1, y1), got {tuple(box)}")
        b = tuple(float(v) for v in box)
        self = super().__new__(cls, (None if image is None else int(image), b))
        if kind not in ("image", "frames", "page", "track"):
            raise InputError(f"evidence kind must be 'image', 'page', 'frames' or 'track', not "
                             f"{kind!r}")
        if (kind in ("frames", "track")) != (video is not None):
            raise InputError("video evidence needs a video index (and only it has one)")
        if kind in ("frames", "track"):
            if frames is None or len(frames) != 2:
                raise InputError(f"video evidence needs frames=(start, end), got {frames}")
            frames = (int(frames[0]), int(frames[1]))
        self.kind, self.video, self.frames = kind, video, frames
        self.track = None if track is None else tuple(
            (int(f), tuple(float(v) for v in bx)) for f, bx in track)  # type: ignore[misc]
        return self

    @classmethod
    def in_image(cls, image: int, box: Sequence[float]) -> "Evidence":
        return cls(image, box)

    @classmethod
    def on_page(cls, page: int, box: Sequence[float]) -> "Evidence":
        """A box on page ``page`` (the page-th image of a multi-image prompt)."""
        return cls(page, box, kind="page")

    @classmethod
    def in_frames(cls, video: int, frames: tuple[int, int], box: Sequence[float]) -> "Evidence":
        """A box in frames ``[start, end)`` of video ``video``."""
        return cls(None, box, kind="frames", video=video, frames=frames)

    @classmethod
    def in_frame(cls, video: int, frame: int, box: Sequence[float]) -> "Evidence":
        return cls.in_frames(video, (frame, frame + 1), box)

    @classmethod
    def in_track(cls, video: int, boxes: dict[int, Sequence[float]]) -> "Evidence":
        """A moving box: ``boxes[f]`` in frame f of video ``video`` (frames absent from the
        dict are not evidence). Its ``box`` is the hull of all of them, ``frames`` their span."""
        if not boxes:
            raise InputError("a track needs at least one (frame, box)")
        items = sorted((int(f), tuple(float(v) for v in b)) for f, b in boxes.items())
        for f, b in items:
            if len(b) != 4:
                raise InputError(f"track box of frame {f} must have 4 numbers, got {b}")
        hull = (min(b[0] for _, b in items), min(b[1] for _, b in items),
                max(b[2] for _, b in items), max(b[3] for _, b in items))
        return cls(None, hull, kind="track", video=video,
                   frames=(items[0][0], items[-1][0] + 1), track=items)

    def parts(self) -> list[tuple[tuple[int, int], Box]]:
        """Video evidence as ``[((start, end), box), ...]``: one part for a frame range, one per
        frame for a track."""
        if self.kind == "track":
            return [((f, f + 1), b) for f, b in self.track or ()]
        return [(self.frames, self.box)]  # type: ignore[list-item]

    @property
    def image(self) -> int | None:
        return self[0]

    @property
    def box(self) -> Box:
        return self[1]

    def _key(self) -> tuple[Any, ...]:
        return (self[0], self[1], self.kind, self.video, self.frames, self.track)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Evidence):
            return self._key() == other._key()
        if self.video is not None:  # video evidence is never a plain (image, box) pair
            return False
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return tuple.__hash__(self)  # equal evidence has equal (image, box)

    def __repr__(self) -> str:
        if self.kind == "track":
            return f"Evidence.in_track({self.video}, {dict(self.track or ())})"
        if self.kind == "frames":
            return f"Evidence.in_frames({self.video}, {self.frames}, {self.box})"
        return f"Evidence.{'on_page' if self.kind == 'page' else 'in_image'}({self[0]}, {self[1]})"

    def __reduce__(self) -> Any:
        return (_rebuild, (self[0], self[1], self.kind, self.video, self.frames, self.track))

    def to_json(self) -> Any:
        """The JSON form ``Evidence.from_json`` reads (a plain list for a box in image 0)."""
        def num(b: Box) -> list[float]:
            return [int(v) if float(v).is_integer() else v for v in b]

        coords = num(self.box)
        if self.kind == "track":
            return {"video": self.video, "track": {str(f): num(b) for f, b in self.track or ()}}
        if self.kind == "frames":
            return {"video": self.video, "frames": list(self.frames or ()), "box": coords}
        if self.kind == "page":
            return {"page": self[0], "box": coords}
        return coords if self[0] == 0 else {"image": self[0], "box": coords}

    @classmethod
    def coerce(cls, b: Any) -> "Evidence":
        """Accept an ``Evidence``, ``(x0, y0, x1, y1)`` (image 0), ``(image, box)`` or a dict
        ``{"image"|"page": i, "box": [...]}`` / ``{"video": v, "frames": [a, b], "box": [...]}``
        (one frame: ``"frame": f``)."""
        if isinstance(b, Evidence):
            return b
        if isinstance(b, dict):
            return cls.from_json(b)
        if len(b) == 4 and all(isinstance(v, (int, float)) for v in b):
            return cls(0, b)
        img, box = b
        return cls(int(img), box)

    @classmethod
    def from_json(cls, d: Any) -> "Evidence":
        if isinstance(d, (list, tuple)):
            return cls.coerce(d)
        if isinstance(d, dict) and set(d) in ({"video", "track"}, {"track"}):
            tr = d["track"]
            if not isinstance(tr, dict):
                raise InputError(f"\"track\" must map frame -> box, got {tr!r}")
            return cls.in_track(d.get("video", 0), {int(f): b for f, b in tr.items()})
        if not isinstance(d, dict) or "box" not in d:
            raise InputError(f"evidence must be [x0, y0, x1, y1] or an object with a \"box\", "
                             f"got {d!r}")
        keys = set(d) - {"box"}
        if keys <= {"image"}:
            return cls(d.get("image", 0), d["box"])
        if keys == {"page"}:
            return cls(d["page"], d["box"], kind="page")
        if keys in ({"video", "frames"}, {"video", "frame"}, {"frames"}, {"frame"}):
            fr = d.get("frames")
            if fr is None:
                fr = (d["frame"], d["frame"] + 1)
            return cls.in_frames(d.get("video", 0), tuple(fr), d["box"])  # type: ignore[arg-type]
        raise InputError(f"evidence object keys {sorted(d)}: use box with image, page, or "
                         "video + frames (or frame); or video + track")


def _rebuild(image: Any, box: Any, kind: str, video: Any, frames: Any,
             track: Any = None) -> Evidence:
    return Evidence(image, box, kind=kind, video=video, frames=frames, track=track)


def check_evidence(ev: Evidence, images: Sequence[Any], videos: Sequence[Video],
                   what: str = "evidence") -> None:
    """Raise an ``InputError`` if ``ev`` points outside the example's images / videos."""
    if ev.kind in ("frames", "track"):
        v = ev.video
        if not 0 <= v < len(videos):  # type: ignore[operator]
            raise InputError(f"{what} box refers to video {v}, but the example has "
                             f"{len(videos)} video(s)")
        n = len(videos[v])  # type: ignore[index]
        w, h = videos[v].size  # type: ignore[index]
        for (a, b), box in ev.parts():
            if not 0 <= a < b <= n:
                raise InputError(f"{what} frame range [{a}, {b}) lies outside video {v}, which "
                                 f"has {n} frame(s) (frames are 0-based, the end is exclusive)")
            _check_inside(box, w, h, what, f"the frames of video {v}")
        return
    else:
        name = "page" if ev.kind == "page" else "image"
        i = ev[0]
        if not 0 <= i < len(images):  # type: ignore[operator]
            raise InputError(f"{what} box refers to {name} {i}, but the example has "
                             f"{len(images)} image(s)")
        w, h = images[i].size  # type: ignore[index]
        _check_inside(ev.box, w, h, what, f"{name} {i}")


def _check_inside(box: Box, w: int, h: int, what: str, where: str) -> None:
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"{what} box {(x0, y0, x1, y1)} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise InputError(f"{what} box {(x0, y0, x1, y1)} lies outside {where} of size {w}x{h} "
                         "(width x height); boxes are (x0, y0, x1, y1) in original-image "
                         "pixels, x1/y1 exclusive")


@dataclass
class GroundedExample:
    """One grounded question.

    ``boxes`` are the evidence regions and ``distractors`` other objects that are not the
    evidence, each an ``Evidence`` (``(image_index, (x0, y0, x1, y1))`` tuples, in original-image
    pixels, x1/y1 exclusive, are read as boxes in images). ``videos``: ``Video``s of the example
    (frame-range evidence refers to them by index).

    ``raw_prompt``: the question is the whole prompt, used verbatim (no chat template), and
    carries the model family's own image (video) token once per image (video), e.g.
    ``"USER: <image> What colour is the square? ASSISTANT:"`` for LLaVA. A question that holds
    the family's image token is also used verbatim when the processor has no chat template.

    Example:
        ```python
        from PIL import Image
        from corelens import Evidence, GroundedExample

        example = GroundedExample(
            images=[Image.new("RGB", (64, 64), "white")],
            question="what colour is the square ?",
            answer="red",
            boxes=[(8, 8, 24, 24)],  # the evidence: (x0, y0, x1, y1) in image 0
            distractors=[Evidence.in_image(0, (40, 40, 56, 56))],
            id="ex-0",
        ).validate()
        example.boxes[0].kind, example.boxes[0].box  # ('image', (8.0, 8.0, 24.0, 24.0))
        ```
    """

    images: list[Image.Image]
    question: str
    answer: str
    boxes: list[Evidence]
    distractors: list[Evidence] = field(default_factory=list)
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    videos: list[Video] = field(default_factory=list)
    raw_prompt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.images, Image.Image):
            self.images = [self.images]
        self.images = list(self.images or [])
        if isinstance(self.videos, Video):
            self.videos = [self.videos]
        self.videos = [Video.coerce(v) for v in self.videos or []]
        self.boxes = [Evidence.coerce(b) for b in self.boxes]
        self.distractors = [Evidence.coerce(b) for b in self.distractors]

    def validate(self, evidence: bool = True) -> "GroundedExample":
        """Raise an ``InputError`` naming the example if anything is off. ``evidence=False``
        leaves the boxes' fit to the images to the caller (``prepare`` checks it)."""
        name = f"example {self.id!r}" if self.id is not None else "example"
        if not self.images and not self.videos:
            raise InputError(f"{name}: no image or video")
        if not str(self.answer).strip():
            raise InputError(f"{name}: the answer is empty")
        if not str(self.question).strip():
            raise InputError(f"{name}: the question is empty")
        if not isinstance(self.raw_prompt, bool):
            raise InputError(f"{name}: raw_prompt must be True or False, got "
                             f"{self.raw_prompt!r}")
        if not self.boxes:
            raise InputError(f"{name}: no evidence box")
        if not evidence:
            return self
        for kind, entries in (("evidence", self.boxes), ("distractor", self.distractors)):
            for ev in entries:
                try:
                    check_evidence(ev, self.images, self.videos, kind)
                except InputError as e:
                    raise InputError(f"{name}: {e}") from None
        return self


def _entry(b: Any) -> Evidence:
    """Accept ``(x0, y0, x1, y1)`` (image 0), ``(image, (x0, y0, x1, y1))`` or an ``Evidence``."""
    return Evidence.coerce(b)


def split_examples(examples: Sequence[Any], eval_frac: float = 0.5, seed: int = 0
                   ) -> tuple[list[Any], list[Any]]:
    """A seeded split into a scoring set (to choose heads with) and an evaluation set (to
    measure every claim about them on); both non-empty and disjoint."""
    n = len(examples)
    n_eval = round(n * eval_frac)
    if n < 2 or not 0 < n_eval < n:
        raise InputError(f"a study needs a scoring and an evaluation set: {n} examples with "
                         f"eval_frac={eval_frac} leave one empty; pass more examples or "
                         "eval_examples=")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    ev = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in ev],
            [ex for i, ex in enumerate(examples) if i in ev])


def check_disjoint(scoring: Sequence[Any], evaluation: Sequence[Any],
                   what: str = "the evaluation set") -> None:
    """Refuse a scoring set that shares an example id with ``evaluation``: a claim measured on
    the examples that chose the heads is in-sample."""
    ids = {getattr(ex, "id", None) for ex in scoring} - {None}
    shared = ids & {getattr(ex, "id", None) for ex in evaluation}
    if shared:
        raise InputError(f"the scoring set shares {len(shared)} example id(s) with {what} "
                         f"(e.g. {sorted(shared)[0]!r}): a claim measured on the examples that "
                         "chose the heads is in-sample; pass disjoint sets")
