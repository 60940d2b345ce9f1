"""Images / videos + prompts (+ answers, evidence) -> ``MultimodalBatch``, through the family's
processor."""

from __future__ import annotations

import unicodedata
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from corelens import compat
from corelens.core.resolution import settings_of
from corelens.data.batch import MultimodalBatch
from corelens.data.examples import Evidence, Video, check_evidence
from corelens.data.layout import FeatureRows, ImageLayout, VisionLayout
from corelens.data.tower import TowerLayout
from corelens.errors import InputError, LayoutError
from corelens.families import FAMILIES
from corelens.families.base import PLACEHOLDER, VIDEO_PLACEHOLDER, Family


def _as_image_lists(images: Any, n: int) -> list[list[Image.Image]]:
    if images is None:
        return [[] for _ in range(n)]
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if n == 1 and images and all(isinstance(im, Image.Image) for im in images):
        return [images]
    if len(images) != n:
        raise InputError(
            f"got {len(images)} image entries for {n} prompts: pass one image (or a list of "
            "images) per prompt"
        )
    out = []
    for e, item in enumerate(images):
        lst = [item] if isinstance(item, Image.Image) else list(item or [])
        for im in lst:
            if not isinstance(im, Image.Image):
                raise InputError(f"example {e}: images must be PIL images, got {type(im).__name__}")
        # RGB images as given (the processor copies them anyway), others converted
        out.append([im if im.mode == "RGB" else im.convert("RGB") for im in lst])
    return out


def _plain_rgb(image_lists: list[list[Image.Image]]) -> bool:
    """Every image RGB with no transparency key (HF composites those onto white)."""
    return all(im.mode == "RGB" and "transparency" not in im.info
               for ims in image_lists for im in ims)


def _as_video_lists(videos: Any, n: int) -> list[list[Video]]:
    """Per example, a list of ``Video``s. A video may be given as a ``Video``, a list of PIL
    frames or a ``[T, H, W, 3]`` array; with one prompt, a single video needs no list."""
    if videos is None:
        return [[] for _ in range(n)]

    def one(v: Any) -> bool:
        return isinstance(v, Video) or (isinstance(v, np.ndarray) and v.ndim == 4) or (
            isinstance(v, (list, tuple)) and bool(v)
            and all(isinstance(f, Image.Image) for f in v))

    if n == 1 and one(videos):
        videos = [[videos]]
    videos = list(videos)
    if len(videos) != n:
        raise InputError(f"got {len(videos)} video entries for {n} prompts: pass one video (or "
                         "a list of videos) per prompt")
    out = []
    for e, item in enumerate(videos):
        lst = [] if item is None else [item] if one(item) else list(item)
        try:
            out.append([Video.coerce(v) for v in lst])
        except InputError as err:
            raise InputError(f"example {e}: {err}") from None
    return out


def _as_boxes(boxes: Any, image_lists: list[list[Image.Image]], video_lists: list[list[Video]],
              ids: Sequence[Any], what: str) -> list[list[Evidence]]:
    """Normalise evidence to ``Evidence`` per example and check it against the inputs."""
    n = len(image_lists)
    if boxes is None:
        return [[] for _ in range(n)]
    if len(boxes) != n:
        raise InputError(f"got {what} boxes for {len(boxes)} examples, but {n} prompts")
    out: list[list[Evidence]] = []
    for e, item in enumerate(boxes):
        entries = _evidence_list(item)
        for ev in entries:
            try:
                check_evidence(ev, image_lists[e], video_lists[e], what)
            except InputError as err:
                raise InputError(f"{_where(e, ids[e])}: {err}") from None
        out.append(entries)
    return out


def _evidence_list(item: Any) -> list[Evidence]:
    """One example's evidence as a list of ``Evidence``."""
    if item is None:
        return []
    if isinstance(item, dict):
        entries: list[Evidence] = []
        for img, bx in item.items():
            many = bx and isinstance(bx[0], (list, tuple))
            entries += [Evidence(int(img), b) for b in (bx if many else [bx])]
        return entries
    if isinstance(item, Evidence) or (
            len(item) == 4 and all(isinstance(v, (int, float)) for v in item)):
        return [Evidence.coerce(item)]
    return [Evidence.coerce(b) for b in item]


def prepare(
    family: Family,
    hf_model: Any,
    processor: Any,
    images: Any,
    prompts: str | Sequence[str],
    answers: str | Sequence[str] | None = None,
    boxes: Any = None,
    *,
    distractors: Any = None,
    videos: Any = None,
    ids: Sequence[str | None] | None = None,
    chat_template: bool = True,
    raw_prompts: bool | Sequence[bool] | None = None,
    device: torch.device | str | None = None,
) -> MultimodalBatch:
    """Run the family's chat template and processor; record layout and query positions.

    With ``chat_template=True`` each prompt is a question (``<image>`` marks where images go and
    ``<video>`` where videos go; without marks the images come first, then the videos). A raw
    prompt is used verbatim instead and must contain the family's own image (video) token once
    per image (video): every prompt with ``chat_template=False``, the prompts whose
    ``raw_prompts`` entry is true (one flag per prompt, or one for all:
    ``GroundedExample.raw_prompt``), and -- when the processor has no chat template -- every
    prompt that holds the family's image (video) token. With no chat template, a prompt of an
    example with images or videos and none of their tokens is an ``InputError``. The layout is
    read from the tokenised ids either way.

    Each answer must survive tokenisation: an answer that tokenises to the tokenizer's unknown
    token, or whose tokens do not decode back to it (up to whitespace and Unicode
    normalisation), is an ``InputError`` (it would be scored as something else). Prompts may
    hold unknown words.

    ``videos``: per example a list of videos (``Video``, a list of PIL frames, or a ``[T, H, W,
    3]`` array), for the families that take them (``Family.supports_video``). The frames are
    used as given (no sampling); their ``Video.fps`` / ``frame_indices`` go to the processor as
    video metadata. ``boxes`` / ``distractors``: per example a list of ``Evidence`` (or
    ``(image, box)`` pairs, or a bare box for image 0).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    n = len(prompts)
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and len(answers) != n:
        raise InputError(f"got {len(answers)} answers for {n} prompts")
    image_lists = _as_image_lists(images, n)
    video_lists = _as_video_lists(videos, n)
    has_video = any(video_lists)
    if has_video:
        if not family.supports_video:
            video = ", ".join(n for n, f in FAMILIES.items() if f.supports_video)
            raise InputError(f"the {family.name} family does not take videos in corelens (video "
                             f"families: {video}); pass the frames as images instead")
        family.check_videos([len(v) for vs in video_lists for v in vs])
    example_ids = list(ids) if ids is not None else [None] * n
    if len(example_ids) != n:
        raise InputError(f"got {len(example_ids)} ids for {n} prompts")
    box_lists = _as_boxes(boxes, image_lists, video_lists, example_ids, "evidence")
    distractor_lists = _as_boxes(distractors, image_lists, video_lists, example_ids, "distractor")
    raw_flags = _raw_flags(raw_prompts, n, chat_template)
    tokenizer = processor.tokenizer
    img_tok = family.image_token_string(processor)
    vid_tok = family.video_token_string(processor) if has_video else None
    texts, prompt_texts = _texts(family, processor, prompts, answers, image_lists, video_lists,
                                 raw_flags, example_ids, (img_tok, vid_tok))

    kw: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(image_lists):
        # nested per example: processors that treat multi-image examples differently
        # (LLaVA-OneVision does not tile them) need to know which images go together
        kw["images"] = image_lists
        if (not has_video and _plain_rgb(image_lists)
                and "do_convert_rgb" in settings_of(processor.image_processor)):
            kw["do_convert_rgb"] = False  # already RGB: HF's conversion would only copy them
    if has_video:
        flat = [v for vs in video_lists for v in vs]
        kw["videos"] = [v.array() for v in flat]
        kw["video_metadata"] = [v.metadata() for v in flat]
        kw["do_sample_frames"] = False  # the frames given are the frames the model sees
    kw.update(family.processor_kwargs())
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = processor(**kw)
    finally:
        tokenizer.padding_side = old_side
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if answers is None:
        answer_tokens, query_positions, prompt_lengths = _no_answers(inputs["attention_mask"])
    else:
        answer_tokens, query_positions, prompt_lengths = _answer_spans(
            tokenizer, inputs["input_ids"], inputs["attention_mask"], texts, prompt_texts,
            answers, example_ids)

    layout = build_layout(family, hf_model.config, processor, inputs, image_lists, video_lists)
    inputs["position_ids"] = family.position_ids(hf_model, inputs)
    batch = MultimodalBatch(inputs=inputs, layout=layout, query_positions=query_positions,
                            answer_tokens=answer_tokens, prompts=texts, images=image_lists,
                            boxes=box_lists, distractors=distractor_lists,
                            ids=example_ids, videos=video_lists,
                            prompt_lengths=prompt_lengths)
    if device is None or all(v.device == torch.device(device) for v in inputs.values()):
        return batch  # already there (``to`` would copy the batch for nothing)
    return batch.to(device)


def _texts(family: Family, processor: Any, prompts: list[str], answers: Sequence[Any] | None,
           image_lists: list[list[Image.Image]], video_lists: list[list[Video]],
           raw_flags: list[bool], example_ids: list[Any], tokens: tuple[str, str | None]
           ) -> tuple[list[str], list[str]]:
    """(the texts with their answers, the prompts alone). Each distinct (question, images,
    videos, raw) is checked once, the examples in order (the first bad one raises); the chat
    template renders the distinct questions in one call."""
    has_template = family.has_chat_template(processor)
    templated: dict[tuple[str, int, int, bool], bool] = {}
    keys = []
    for e, (p, ims, vids) in enumerate(zip(prompts, image_lists, video_lists)):
        key = (p, len(ims), len(vids), raw_flags[e])
        if key not in templated:
            templated[key] = _templated(family, p, len(ims), len(vids), raw_flags[e],
                                        has_template, tokens, (e, example_ids[e]))
        if answers is not None and (not answers[e] or not str(answers[e]).strip()):
            raise InputError(f"example {e}: the answer is empty")
        keys.append(key)
    chat = [key for key, t in templated.items() if t]
    text_of = {key: key[0] for key, t in templated.items() if not t}
    text_of.update(zip(chat, family.build_prompts(processor, [key[:3] for key in chat])))
    prompt_texts = [text_of[key] for key in keys]
    if answers is None:
        return prompt_texts, prompt_texts
    return [t + ("" if t[-1:].isspace() else " ") + str(a)
            for t, a in zip(prompt_texts, answers)], prompt_texts


def _templated(family: Family, p: str, n_images: int, n_videos: int, raw: bool,
               has_template: bool, tokens: tuple[str, str | None],
               example: tuple[int, Any]) -> bool:
    """Whether the prompt goes through the chat template (else it is used verbatim), once it
    is checked against its images / videos."""
    e, ex_id = example
    img_tok, vid_tok = tokens
    if not raw and not has_template:
        own = [(tok, what) for tok, what, k in ((img_tok, "image", n_images),
                                                (vid_tok, "video", n_videos)) if k and tok]
        if own and not any(tok in p for tok, _ in own):
            toks = " / ".join(repr(tok) for tok, _ in own)
            what = " / ".join(w for _, w in own)
            also = (f" ({PLACEHOLDER!r} marks images only for the chat template; "
                    f"{family.name}'s own image token is {img_tok!r})"
                    if img_tok != PLACEHOLDER and PLACEHOLDER in p else "")
            raise InputError(
                f"{_where(e, ex_id)}: the processor has no chat template and the "
                f"prompt holds no {toks}{also}, so there is no way to place the example's "
                f"{what}(s). Fix: write the whole prompt with {toks} once per {what} "
                "(used verbatim: set GroundedExample.raw_prompt=True, or pass "
                "prepare(..., raw_prompts=[...]) / chat_template=False), or give the "
                "processor a chat template (processor.chat_template = '...', or a "
                "chat_template.jinja in the model folder)"
            )
        raw = True  # no template: the prompt carries its own image / video tokens
    if raw:
        for tok, what, k in ((img_tok, "image", n_images), (vid_tok, "video", n_videos)):
            n_marks = p.count(tok) if tok else 0
            if n_marks != k:
                desc = (f"has no {what} placeholder" if n_marks == 0
                        else f"has {n_marks} {tok!r}")
                raise InputError(
                    f"{_where(e, ex_id)}: the raw prompt {desc} but {k} {what}(s) "
                    f"were given; put {tok!r} in the prompt once per {what} (or, with a "
                    "chat template, pass the question without raw_prompt / "
                    "chat_template=False)"
                )
        return False
    for mark, what, k in ((PLACEHOLDER, "image", n_images), (VIDEO_PLACEHOLDER, "video", n_videos)):
        n_marks = p.count(mark)
        if n_marks not in (0, k) or (n_marks == 0 and k and (
                PLACEHOLDER in p or VIDEO_PLACEHOLDER in p)):
            raise InputError(
                f"example {e}: the prompt marks {n_marks} {what}(s) with {mark!r} but "
                f"{k} {what}(s) were given"
            )
    return True


def _no_answers(mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """No answers: no answer tokens, the last position queried, the whole text the prompt."""
    n, seq = mask.shape
    return (list(torch.zeros(0, dtype=torch.long).split([0] * n)),
            list(torch.full((n,), seq - 1, dtype=torch.long).split(1)),
            mask.bool().sum(1).tolist())


def _answer_spans(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, texts: list[str],
                  prompt_texts: list[str], answers: Sequence[Any], example_ids: list[Any]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per example: the answer's tokens, the positions that predict them, the prompt's length.

    The answer's tokens: the text alone, tokenised with and without the answer (image tokens
    are expanded in the middle of the prompt, never at its end, so the images need not be
    processed twice); checked against the processor's own ids. Only the distinct texts are
    tokenised (examples share prompts, often whole texts) and split once per distinct (prompt,
    text); the checks against the processor's row run once per example, in order."""
    seq = ids.shape[1]
    distinct = list(dict.fromkeys(prompt_texts + texts))
    text_ids = dict(zip(distinct, compat.token_ids(tokenizer, distinct)))
    spans: dict[tuple[str, str], list[int] | None] = {}  # the answer's tokens, None: not apart
    for key in dict.fromkeys(zip(prompt_texts, texts)):
        prompt, full = text_ids[key[0]], text_ids[key[1]]
        apart = len(full) > len(prompt) and full[:len(prompt)] == prompt
        spans[key] = full[len(prompt):] if apart else None
    real = mask.numpy() != 0  # numpy: these few tiny ops cost several times less than in torch
    n_real = real.sum(1).tolist()
    widest = max(1, min(seq, max((len(t) for t in spans.values() if t), default=1)))
    # left padding (as asked): each example's real tokens are the tail of its row
    left = bool((real[:, 1:] >= real[:, :-1]).all())
    ends = ids.numpy()[:, seq - widest:].tolist() if left else None
    checked: set[Any] = set()  # (prompt, text)s and (tokens, answer)s whose answer is checked
    n_ans_of, tails, queries, prompt_lengths = [], [], [], []
    for e, key in enumerate(zip(prompt_texts, texts)):
        want, nr = spans[key], n_real[e]
        if want is None or len(want) >= nr:
            raise InputError(
                f"example {e}: the answer {answers[e]!r} is not tokenisable apart from the "
                "prompt (tokenising prompt + answer changes the prompt's tokens, or adds none)"
            )
        n_ans = len(want)
        tail = (ends[e][widest - n_ans:] if ends is not None
                else ids[e][mask[e].bool()][-n_ans:].tolist())
        if tail != want:
            raise LayoutError(f"{_where(e, example_ids[e])}: the processor tokenises the "
                              f"answer {answers[e]!r} unlike its tokenizer does alone")
        if key not in checked:
            answer = (tuple(tail), str(answers[e]))
            if answer not in checked:
                _check_answer(tokenizer, tail, answer[1], _where(e, example_ids[e]))
            checked |= {key, answer}
        prompt_lengths.append(nr - n_ans)
        n_ans_of.append(n_ans)
        tails += tail
        queries += range(seq - n_ans - 1, seq - 1)
    return (list(torch.tensor(tails, dtype=ids.dtype).split(n_ans_of)),
            list(torch.tensor(queries, dtype=torch.long).split(n_ans_of)), prompt_lengths)


def _where(e: int, ex_id: Any) -> str:
    return f"example {e}" + ("" if ex_id is None else f" (id {ex_id!r})")


def _raw_flags(raw_prompts: bool | Sequence[bool] | None, n: int,
               chat_template: bool) -> list[bool]:
    """Per prompt: is it used verbatim (no chat template)?"""
    if raw_prompts is None or isinstance(raw_prompts, bool):
        flags = [bool(raw_prompts)] * n
    else:
        flags = [bool(r) for r in raw_prompts]
        if len(flags) != n:
            raise InputError(f"got {len(flags)} raw_prompts flags for {n} prompts")
    return [f or not chat_template for f in flags]


def _squash(text: str) -> str:
    """The text up to whitespace and Unicode normalisation (tokenizers may apply NFC / NFKC)."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def _check_answer(tokenizer: Any, tokens: torch.Tensor, answer: str, where: str) -> None:
    """Refuse an answer whose tokens are not the answer: the unknown token, or tokens that do not
    decode back to it (up to whitespace and Unicode normalisation). Scoring them would score a
    different string."""
    ids = [int(t) for t in tokens]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        unk_tok = getattr(tokenizer, "unk_token", None) or f"id {unk}"
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise InputError(
            f"{where}: the answer {answer!r} holds text the tokenizer does not know: it "
            f"tokenises to {pieces}, so it would be scored as {unk_tok!r}, not as the answer. "
            "Fix: write the answer in words of the model's vocabulary (check "
            "model.tokenizer.tokenize(answer)), or drop the example"
        )
    want = _squash(answer)
    if _squash(tokenizer.decode(ids, skip_special_tokens=False)) == want:
        return  # the usual case: one decode
    decoded = [tokenizer.decode(ids, skip_special_tokens=skip) for skip in (False, True)]
    if want not in {_squash(d) for d in decoded}:
        raise InputError(
            f"{where}: the answer {answer!r} does not survive tokenisation: its tokens decode to "
            f"{decoded[0]!r}, so the score would be for that string, not the answer. Fix: "
            f"write the answer as the tokenizer gives it back (e.g. {decoded[1].strip()!r})"
        )


def tower_layout(family: Family, hf_model: Any, processor: Any, batch: MultimodalBatch,
                 hook_name: str) -> TowerLayout:
    """The vision tower's pictures for ``batch`` (``HookedMLLM.tower_layout``)."""
    if any(im.is_video for ex in batch.layout.images for im in ex):
        raise InputError("this batch holds videos: their frames go through the vision tower in "
                         "a call of their own, so a tower hook fires twice and its rows cannot "
                         "be told apart; map tower rows on batches of images only")
    grids, example, image, index = [], [], [], []
    g = 0
    for e, ims in enumerate(batch.layout.images):
        for im in ims:
            got = family.tower_grids(hf_model.config, processor, batch.inputs, g, im.size)
            grids += got
            example += [e] * len(got)
            image += [im.image_index] * len(got)
            index += range(len(got))
            g += 1
    return TowerLayout(
        grids, torch.tensor(example, dtype=torch.long), torch.tensor(image, dtype=torch.long),
        torch.tensor(index, dtype=torch.long), prefix=family.tower_prefix(hf_model.config),
        merge=family.tower_merge(hf_model.config), flat=family.flat_tower,
        blocks=family.tower_block_order(hf_model, batch.inputs, hook_name))


def build_layout(
    family: Family, hf_config: Any, processor: Any, inputs: dict[str, torch.Tensor],
    image_lists: list[list[Image.Image]], video_lists: list[list[Video]] | None = None,
) -> VisionLayout:
    """Pair each image's (video's) feature rows with the image-token (video-token) positions it
    fills, in order. Per example: its images, then its videos."""
    ids = inputs["input_ids"]
    video_lists = video_lists or [[] for _ in image_lists]
    tid = family.image_token_id(hf_config, processor)
    vid = family.video_token_id(hf_config, processor) if any(video_lists) else None
    sizes = [im.size for ims in image_lists for im in ims]
    keys = family.layout_keys(inputs, sizes) if sizes else []
    seen: dict[Any, FeatureRows] = {}  # images the family lays out alike share their rows

    def image_rows(image: int, size: tuple[int, int]) -> FeatureRows:
        key = keys[image]
        if key is None:
            return family.feature_rows(hf_config, processor, inputs, image, size)
        if key not in seen:
            seen[key] = family.feature_rows(hf_config, processor, inputs, image, size)
        return seen[key]

    image_slots = _slots(ids.numpy(), tid, image_lists)
    video_slots = _slots(ids.numpy(), vid, video_lists)
    images: list[list[ImageLayout]] = []
    g = gv = 0
    for e, (ims, vids) in enumerate(zip(image_lists, video_lists)):
        per_image: list[ImageLayout] = []
        if ims:
            rows = [image_rows(g + i, im.size) for i, im in enumerate(ims)]
            per_image += _placed(e, "image", tid, ims, rows, image_slots[e])
        if vids:
            rows = [family.video_feature_rows(hf_config, processor, inputs, gv + i, v.size,
                                              len(v), v.timestamps)
                    for i, v in enumerate(vids)]
            per_image += _placed(e, "video", vid, vids, rows, video_slots[e])
        images.append(per_image)
        g += len(ims)
        gv += len(vids)
    return VisionLayout(images, int(ids.shape[1]))


def _slots(ids: np.ndarray, token: int | None, lists: list[list[Any]]
           ) -> tuple[torch.Tensor, ...]:
    """Per example, the positions of ``token`` in its row: the whole batch found at once."""
    if not any(lists):
        return ()
    rows_at, cols_at = np.nonzero(ids == token)
    counts = np.bincount(rows_at, minlength=len(lists)).tolist()
    return torch.from_numpy(cols_at.astype(np.int64, copy=False)).split(counts)


def _placed(e: int, what: str, token: int | None, items: list[Any], rows: list[FeatureRows],
            slots: torch.Tensor) -> list[ImageLayout]:
    """Example ``e``'s images (videos), each with its feature rows and its run of the slots."""
    sizes = [len(r) for r in rows]
    if sum(sizes) != slots.shape[0]:
        raise LayoutError(
            f"example {e}: input_ids hold {slots.shape[0]} {what} tokens (id {token}) but "
            f"its {len(items)} {what}(s) need {sum(sizes)} "
            f"({', '.join(str(n) for n in sizes)}); the prompt's {what} placeholders "
            f"and the {what}s do not match"
        )
    runs = (slots,) if len(items) == 1 else slots.split(sizes)
    if what == "image":
        return [ImageLayout(i, im.size, at, r) for i, (im, r, at) in enumerate(zip(items, rows,
                                                                                   runs))]
    return [ImageLayout(i, v.size, at, r, modality="video", n_frames=len(v))
            for i, (v, r, at) in enumerate(zip(items, rows, runs))]
