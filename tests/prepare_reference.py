"""``prepare`` the slow obvious way, for the equivalence tests of ``corelens.core.prepare``.

Written WITHOUT ``prepare``'s fast paths (one tokenizer call on distinct texts, per-call caches
of answer checks and of feature rows, slot positions found once for the whole batch): the chat
template rendered per example, one processor call, the answer's tokens found by tokenising every
text twice (with and without its answer), every image's feature rows computed afresh and its
slots found by scanning its own example's ids. ``reference_batch`` returns what ``prepare``
must return (or raises what it must raise) for the same arguments.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import torch

from corelens.data.layout import ImageLayout, VisionLayout
from corelens.errors import InputError, LayoutError


def _texts(model, prompts, answers, image_lists, video_lists, raw_flags):
    fam, proc = model.family, model.processor
    texts, prompt_texts = [], []
    for e, p in enumerate(prompts):
        raw = raw_flags[e] or not fam.has_chat_template(proc)
        text = p if raw else fam.build_prompt(proc, p, len(image_lists[e]), len(video_lists[e]))
        prompt_texts.append(text)
        if answers is not None:
            text = text + ("" if text[-1:].isspace() else " ") + str(answers[e])
        texts.append(text)
    return texts, prompt_texts


def _squash(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def _check_answer(tokenizer, tokens, answer, where):
    ids = [int(t) for t in tokens]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise InputError(f"{where}: the answer {answer!r} holds text the tokenizer does not know")
    decoded = [tokenizer.decode(ids, skip_special_tokens=s) for s in (False, True)]
    if _squash(answer) not in {_squash(d) for d in decoded}:
        raise InputError(f"{where}: the answer {answer!r} does not survive tokenisation")


def _where(e, ex_id):
    return f"example {e}" + ("" if ex_id is None else f" (id {ex_id!r})")


def reference_layout(model, inputs, image_lists, video_lists) -> VisionLayout:
    fam, cfg, proc = model.family, model.hf_model.config, model.processor
    ids = inputs["input_ids"]
    images, g, gv = [], 0, 0
    for e, (ims, vids) in enumerate(zip(image_lists, video_lists)):
        per = []
        for what, items in (("image", ims), ("video", vids)):
            if not items:
                continue
            token = (fam.image_token_id(cfg, proc) if what == "image"
                     else fam.video_token_id(cfg, proc))
            slots = [p for p in range(ids.shape[1]) if int(ids[e, p]) == token]
            start = 0
            for i, item in enumerate(items):
                if what == "image":
                    rows = fam.feature_rows(cfg, proc, inputs, g + i, item.size)
                else:
                    rows = fam.video_feature_rows(cfg, proc, inputs, gv + i, item.size,
                                                  len(item), item.timestamps)
                if start + len(rows) > len(slots):
                    raise LayoutError(f"example {e}: too few {what} tokens")
                per.append(ImageLayout(i, item.size,
                                       torch.tensor(slots[start:start + len(rows)],
                                                    dtype=torch.long), rows,
                                       modality=what,
                                       n_frames=len(item) if what == "video" else 1))
                start += len(rows)
            if start != len(slots):
                raise LayoutError(f"example {e}: too many {what} tokens")
        images.append(per)
        g += len(ims)
        gv += len(vids)
    return VisionLayout(images, int(ids.shape[1]))


def reference_position_ids(model, inputs):
    """M-RoPE families: HF's ``get_rope_index`` on the whole batch (no sharing between alike
    examples); others: the family's position ids."""
    hf = model.hf_model
    if not hasattr(getattr(hf, "model", None), "get_rope_index"):
        return model.family.position_ids(hf, inputs)
    ids, cfg = inputs["input_ids"], hf.config
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    pos, _ = hf.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs.get("attention_mask"))
    return pos


def reference_batch(model, examples) -> dict[str, Any]:
    """What ``model.prepare_examples(examples)`` must hold, field by field."""
    examples = [ex.validate() for ex in examples]
    proc, tok = model.processor, model.processor.tokenizer
    image_lists = [[im.convert("RGB") for im in ex.images] for ex in examples]
    video_lists = [list(getattr(ex, "videos", []) or []) for ex in examples]
    answers = [ex.answer for ex in examples]
    texts, prompt_texts = _texts(model, [ex.question for ex in examples], answers, image_lists,
                                 video_lists, [ex.raw_prompt for ex in examples])
    kw: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(image_lists):
        kw["images"] = image_lists
    if any(video_lists):
        flat = [v for vs in video_lists for v in vs]
        kw["videos"] = [v.array() for v in flat]
        kw["video_metadata"] = [v.metadata() for v in flat]
        kw["do_sample_frames"] = False
    kw.update(model.family.processor_kwargs())
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = proc(**kw)
    finally:
        tok.padding_side = side
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full_ids = [tok(t)["input_ids"] for t in texts]  # one text at a time
    prompt_ids = [tok(t)["input_ids"] for t in prompt_texts]
    query_positions, answer_tokens, prompt_lengths = [], [], []
    for e, ex in enumerate(examples):
        real = ids[e][mask[e].bool()]
        pad = ids.shape[1] - real.numel()
        full, prompt = full_ids[e], prompt_ids[e]
        n_ans = len(full) - len(prompt)
        if n_ans <= 0 or full[:len(prompt)] != prompt or n_ans >= real.numel():
            raise InputError(f"example {e}: the answer {answers[e]!r} is not tokenisable apart "
                             "from the prompt")
        if real[-n_ans:].tolist() != full[-n_ans:]:
            raise LayoutError(f"{_where(e, ex.id)}: the processor tokenises the answer "
                              f"{answers[e]!r} unlike its tokenizer does alone")
        lp = real.numel() - n_ans
        _check_answer(tok, real[lp:], str(answers[e]), _where(e, ex.id))
        prompt_lengths.append(lp)
        answer_tokens.append(real[lp:].clone())
        query_positions.append(torch.arange(pad + lp - 1, pad + real.numel() - 1))
    layout = reference_layout(model, inputs, image_lists, video_lists)
    inputs["position_ids"] = reference_position_ids(model, inputs)
    return dict(inputs=inputs, layout=layout, query_positions=query_positions,
                answer_tokens=answer_tokens, prompt_lengths=prompt_lengths, prompts=texts,
                images=image_lists, videos=video_lists)


def assert_same_layout(got: VisionLayout, want: VisionLayout) -> None:
    assert got.seq_len == want.seq_len
    assert len(got.images) == len(want.images)
    for ge, we in zip(got.images, want.images):
        assert len(ge) == len(we)
        for g, w in zip(ge, we):
            assert (g.image_index, g.size, g.modality, g.n_frames) == (
                w.image_index, w.size, w.modality, w.n_frames)
            assert torch.equal(g.positions, w.positions)
            for f in ("kind", "view", "row", "col"):
                a, b = getattr(g.rows, f), getattr(w.rows, f)
                assert a.dtype == b.dtype and torch.equal(a, b), f
            assert len(g.views) == len(w.views)
            for gv, wv in zip(g.views, w.views):
                assert (gv.name, gv.rows, gv.cols, gv.frames, gv.times) == (
                    wv.name, wv.rows, wv.cols, wv.frames, wv.times)
                assert gv.boxes.dtype == wv.boxes.dtype and torch.equal(gv.boxes, wv.boxes)
            assert torch.equal(g.boxes, w.boxes) and torch.equal(g.vision_positions,
                                                                  w.vision_positions)


def assert_same_batch(batch, ref: dict[str, Any]) -> None:
    """Every tensor, every layout field, the answer tokens and query positions."""
    assert sorted(batch.inputs) == sorted(ref["inputs"])
    for k, v in ref["inputs"].items():
        got = batch.inputs[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert_same_layout(batch.layout, ref["layout"])
    for f in ("query_positions", "answer_tokens"):
        got, want = getattr(batch, f), ref[f]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), f
    assert batch.prompt_lengths == ref["prompt_lengths"]
    assert batch.prompts == ref["prompts"]
    assert [[im.tobytes() for im in ims] for ims in batch.images] == [
        [im.tobytes() for im in ims] for ims in ref["images"]]
