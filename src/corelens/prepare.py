"""Images + prompts (+ answers, boxes) -> ``MultimodalBatch``, through the family's processor."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from corelens.batch import Box, MultimodalBatch
from corelens.errors import InputError, LayoutError
from corelens.families.base import PLACEHOLDER, Family
from corelens.layout import ImageLayout, VisionLayout, check_box


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
        out.append([im.convert("RGB") for im in lst])
    return out


def _as_boxes(boxes: Any, image_lists: list[list[Image.Image]]) -> list[list[tuple[int, Box]]]:
    """Normalise boxes to [(image, (x0, y0, x1, y1)), ...] per example and validate them."""
    n = len(image_lists)
    if boxes is None:
        return [[] for _ in range(n)]
    if len(boxes) != n:
        raise InputError(f"got boxes for {len(boxes)} examples, but {n} prompts")
    out: list[list[tuple[int, Box]]] = []
    for e, item in enumerate(boxes):
        entries: list[tuple[int, Any]] = []
        if item is None:
            pass
        elif isinstance(item, dict):
            for img, bx in item.items():
                many = bx and isinstance(bx[0], (list, tuple))
                entries += [(int(img), b) for b in (bx if many else [bx])]
        elif len(item) == 4 and all(isinstance(v, (int, float)) for v in item):
            entries = [(0, item)]
        else:
            entries = [(0, b) if len(b) == 4 else (int(b[0]), b[1]) for b in item]
        norm = []
        for img, bx in entries:
            if not 0 <= img < len(image_lists[e]):
                raise InputError(
                    f"example {e}: box refers to image {img}, but the example has "
                    f"{len(image_lists[e])} image(s)"
                )
            t = check_box(bx, image_lists[e][img].size, where=f"example {e}, image {img}: ")
            norm.append((img, tuple(t.tolist())))
        out.append(norm)
    return out


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
    ids: Sequence[str | None] | None = None,
    chat_template: bool = True,
    device: torch.device | str | None = None,
) -> MultimodalBatch:
    """Run the family's chat template and processor; record layout and query positions.

    With ``chat_template=True`` each prompt is a question (``<image>`` marks where images go;
    without it the images come first). With ``chat_template=False`` the prompt is used verbatim
    and must contain the family's own image token once per image.
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
    box_lists = _as_boxes(boxes, image_lists)
    distractor_lists = _as_boxes(distractors, image_lists)
    example_ids = list(ids) if ids is not None else [None] * n
    tokenizer = processor.tokenizer
    img_tok = family.image_token_string(processor)

    texts, prompt_texts = [], []
    for e, (p, ims) in enumerate(zip(prompts, image_lists)):
        if chat_template:
            n_marks = p.count(PLACEHOLDER)
            if n_marks not in (0, len(ims)):
                raise InputError(
                    f"example {e}: the prompt marks {n_marks} image(s) with {PLACEHOLDER!r} but "
                    f"{len(ims)} image(s) were given"
                )
            text = family.build_prompt(processor, p, len(ims))
        else:
            n_marks = p.count(img_tok)
            if n_marks != len(ims):
                what = "has no image placeholder" if n_marks == 0 else f"has {n_marks} {img_tok!r}"
                raise InputError(
                    f"example {e}: the prompt {what} but {len(ims)} image(s) were given; put "
                    f"{img_tok!r} in the prompt once per image (or use chat_template=True)"
                )
            text = p
        prompt_texts.append(text)
        if answers is not None:
            ans = answers[e]
            if not ans or not str(ans).strip():
                raise InputError(f"example {e}: the answer is empty")
            sep = "" if text[-1:].isspace() else " "
            text = text + sep + str(ans)
        texts.append(text)

    kw: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(image_lists):
        # nested per example: processors that treat multi-image examples differently
        # (LLaVA-OneVision does not tile them) need to know which images go together
        kw["images"] = image_lists
    kw.update(family.processor_kwargs())
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = processor(**kw)
        prompt_enc = processor(**{**kw, "text": prompt_texts}) if answers is not None else enc
    finally:
        tokenizer.padding_side = old_side
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seq = ids.shape[1]

    query_positions, answer_tokens, prompt_lengths = [], [], []
    for e in range(n):
        real = ids[e][mask[e].bool()]
        pad = seq - real.numel()
        p_real = prompt_enc["input_ids"][e][prompt_enc["attention_mask"][e].bool()]
        lp = p_real.numel()
        prompt_lengths.append(lp)
        if answers is None:
            query_positions.append(torch.tensor([pad + lp - 1]))
            answer_tokens.append(torch.zeros(0, dtype=torch.long))
            continue
        if lp >= real.numel() or not torch.equal(real[:lp], p_real):
            raise InputError(
                f"example {e}: the answer {answers[e]!r} is not tokenisable apart from the prompt "
                "(tokenising prompt + answer changes the prompt's tokens, or adds none)"
            )
        answer_tokens.append(real[lp:].clone())
        query_positions.append(torch.arange(pad + lp - 1, pad + real.numel() - 1))

    layout = build_layout(family, hf_model.config, processor, inputs, image_lists)
    inputs["position_ids"] = family.position_ids(hf_model, inputs)
    batch = MultimodalBatch(inputs=inputs, layout=layout, query_positions=query_positions,
                            answer_tokens=answer_tokens, prompts=texts, images=image_lists,
                            boxes=box_lists, distractors=distractor_lists,
                            ids=example_ids,
                            prompt_lengths=prompt_lengths)
    return batch.to(device) if device is not None else batch


def build_layout(
    family: Family, hf_config: Any, processor: Any, inputs: dict[str, torch.Tensor],
    image_lists: list[list[Image.Image]],
) -> VisionLayout:
    """Pair each image's feature rows with the image-token positions it fills, in order."""
    ids = inputs["input_ids"]
    tid = family.image_token_id(hf_config, processor)
    images: list[list[ImageLayout]] = []
    g = 0
    for e, ims in enumerate(image_lists):
        slots = (ids[e] == tid).nonzero().flatten()
        rows = [family.feature_rows(hf_config, processor, inputs, g + i, im.size)
                for i, im in enumerate(ims)]
        need = sum(len(r) for r in rows)
        if need != slots.numel():
            raise LayoutError(
                f"example {e}: input_ids hold {slots.numel()} image tokens (id {tid}) but its "
                f"{len(ims)} image(s) need {need} ({', '.join(str(len(r)) for r in rows)}); the "
                "prompt's image placeholders and the images do not match"
            )
        start, per_image = 0, []
        for i, (im, r) in enumerate(zip(ims, rows)):
            per_image.append(ImageLayout(i, im.size, slots[start:start + len(r)], r))
            start += len(r)
        images.append(per_image)
        g += len(ims)
    return VisionLayout(images, int(ids.shape[1]))
