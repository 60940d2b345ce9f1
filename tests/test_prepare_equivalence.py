"""``prepare``'s fast paths (issue #17, item 3) give exactly the batch of the slow obvious way
(``tests/prepare_reference.py``): every input tensor, every layout field, the answer tokens,
query positions and prompt lengths, on every family; with repeated questions, answers and image
sizes (the per-call caches), several images in one example, videos where the family takes them,
and answers whose tokenisation changes in context (the same clear error)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, grounded_examples, noise_image
from prepare_reference import assert_same_batch, reference_batch, reference_position_ids
from tokenizers import AddedToken

from corelens import GroundedExample, HookedMLLM, InputError
from corelens.data.examples import Evidence, Video
from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.families import FAMILIES
from corelens.families.qwen_vl import image_rope_ids
from corelens.zoo.tiny import tiny_image_sizes


def _examples(name: str) -> list[GroundedExample]:
    exs = grounded_examples(name, 4)
    (w0, h0), (w1, h1) = (tiny_image_sizes(name) * 2)[:2]
    exs += [replace(exs[0], id="again0"), replace(exs[1], id="again1", answer="green"),
            replace(exs[0], id="same-size", images=[noise_image(w0, h0, 9)]),
            GroundedExample([noise_image(w0, h0, 3), noise_image(w1, h1, 4)],
                            "is <image> like <image> ?", "blue", [(1, (0, 0, 4, 4))], id="two")]
    return exs


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_prepare_equals_the_slow_obvious_batch(name, tiny_model):
    model = tiny_model(name)
    exs = _examples(name)
    assert_same_batch(model.prepare_examples(exs), reference_batch(model, exs))
    one = exs[:1]  # no padding, one example
    assert_same_batch(model.prepare_examples(one), reference_batch(model, one))


def _image_modes(w: int, h: int) -> list:
    """The same noise as L, RGBA (half transparent), P with a transparent index, and RGB with a
    transparency key (HF composites the last three onto white)."""
    base = noise_image(w, h, 5)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    pal = base.convert("P")
    pal.info["transparency"] = 0
    keyed = base.copy()
    keyed.info["transparency"] = base.getpixel((0, 0))
    return [base.convert("L"), rgba, pal, keyed]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_images_that_are_not_plain_rgb_give_the_slow_obvious_batch(name, tiny_model):
    """``prepare`` skips HF's RGB conversion when every image is plain RGB; any other image
    (grey, alpha, palette, a transparency key) keeps it, and the pixels equal the slow way's."""
    model = tiny_model(name)
    w, h = tiny_image_sizes(name)[0]
    plain = grounded_examples(name, 1)[0]
    exs = [replace(plain, images=[im], id=f"mode{i}") for i, im in enumerate(_image_modes(w, h))]
    for batch in [[plain] + exs] + [[ex] for ex in exs]:
        assert_same_batch(model.prepare_examples(batch), reference_batch(model, batch))


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if FAMILIES[n].supports_video])
def test_prepare_equals_the_slow_obvious_batch_on_videos(name, tiny_model):
    model = tiny_model(name)
    (w0, h0), (w1, h1) = (tiny_image_sizes(name) * 2)[:2]
    rng = np.random.RandomState(0)

    def video(w, h, fps=None):
        return Video(rng.randint(0, 256, (4, h, w, 3), dtype=np.uint8), fps=fps)

    exs = [GroundedExample([], "what happens ?", "red", [Evidence.in_frame(0, 1, (0, 0, 4, 4))],
                           videos=[video(w0, h0, fps=2.0)], id="v0"),
           GroundedExample([noise_image(w1, h1, 1)], "compare <image> with <video> ?",
                           "blue green", [(0, (0, 0, 4, 4))], videos=[video(w1, h1)], id="v1"),
           GroundedExample([], "what happens ?", "red", [Evidence.in_frame(0, 0, (0, 0, 4, 4))],
                           videos=[video(w0, h0, fps=2.0)], id="v2")]
    assert_same_batch(model.prepare_examples(exs), reference_batch(model, exs))


def _raise(fn):
    try:
        fn()
    except InputError as err:
        return str(err)
    return None


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_an_answer_that_tokenises_unlike_in_context_is_refused_alike(name, tiny_folder):
    """The tiny tokenizers split on whitespace, so give one (of a fresh model: the shared one
    stays as it is) a token that spans the prompt's end and the answer: in context the prompt
    loses its last token, and both ways refuse the example with the same error."""
    model = HookedMLLM.from_pretrained(tiny_folder(name))
    model.processor.tokenizer.add_tokens([AddedToken("answer red", normalized=False)])
    tok = model.family.image_token_string(model.processor)
    exs = grounded_examples(name, 3)
    bad = replace(exs[1], question=f"{tok} what is the color ? answer", answer="red",
                  raw_prompt=True, id="bad")
    batch = [exs[0], bad, exs[2]]
    got = _raise(lambda: model.prepare_examples(batch))
    assert got is not None and got.startswith("example 1: the answer 'red' is not tokenisable "
                                              "apart from the prompt")
    assert got.startswith(_raise(lambda: reference_batch(model, batch)))
    ok = [exs[0], replace(bad, question=bad.question + " ?"), exs[2]]  # the token is not matched
    assert_same_batch(model.prepare_examples(ok), reference_batch(model, ok))


def _affine_reference(rows, cols, cell, scale, offset, size, row_range=None, col_range=None):
    """``ViewGeometry.from_affine``'s boxes, written out (as before it was memoised)."""
    r0, r1 = row_range or (0, rows)
    c0, c1 = col_range or (0, cols)
    xs = (torch.arange(c0, c1 + 1, dtype=torch.float64) * cell[0] * scale[0] + offset[0])
    ys = (torch.arange(r0, r1 + 1, dtype=torch.float64) * cell[1] * scale[1] + offset[1])
    xs, ys = xs.clamp(0, size[0]), ys.clamp(0, size[1])
    boxes = torch.empty(r1 - r0, c1 - c0, 4, dtype=torch.float64)
    boxes[..., 0], boxes[..., 2] = xs[:-1].view(1, -1), xs[1:].view(1, -1)
    boxes[..., 1], boxes[..., 3] = ys[:-1].view(-1, 1), ys[1:].view(-1, 1)
    return boxes.float()


@pytest.mark.parametrize("args", [
    (8, 8, (8, 8), (1.0, 1.0), (0.0, 0.0), (64, 64)),
    (6, 9, (14, 14), (0.37, 0.41), (-3.5, 2.25), (50, 37)),
    (6, 9, (14, 14), (0.37, 0.41), (-3.5, 2.25), (50, 37), (1, 5), (2, 7)),
    (3, 4, (16, 16), (2, 3), (1, -1), (97, 130)),  # ints where floats are expected
])
def test_memoised_geometry_equals_the_formula(args):
    for _ in range(2):  # computed, then from the cache
        view = ViewGeometry.from_affine("v", *args)
        want = _affine_reference(*args)
        assert view.boxes.dtype == want.dtype and torch.equal(view.boxes, want)
        assert (view.rows, view.cols) == tuple(want.shape[:2])
        for newline in (False, True):
            rows = FeatureRows.grid(view, newline_after_row=newline)
            per_row = view.cols + newline
            r = torch.arange(view.rows).repeat_interleave(per_row)
            c = torch.arange(per_row).repeat(view.rows)
            kind = (c == view.cols).long() if newline else torch.zeros_like(c)
            c = torch.where(kind == 1, -1, c)
            for got, exp in zip((rows.kind, rows.view, rows.row, rows.col),
                                (kind, torch.where(kind == 0, 0, -1), r, c)):
                assert torch.equal(got, exp)
            assert rows.views == [view]


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n.startswith("qwen")])
def test_mrope_ids_of_image_batches_equal_hf_on_the_whole_batch(name, tiny_model):
    """Qwen-VL computes the M-RoPE ids of image-only batches itself (numpy, once per kind of
    example); they equal HF's ``get_rope_index`` on the whole batch: alike examples among unlike
    ones, two images in one example, several sizes, padding, one example alone."""
    model = tiny_model(name)
    exs = _examples(name)
    merge = model.hf_model.config.vision_config.spatial_merge_size
    def types_of(batch):
        return (batch.input_ids == model.hf_model.config.image_token_id).long()

    for batch in (model.prepare_examples(exs), model.prepare_examples(exs[-1:])):
        ours = image_rope_ids(types_of(batch), batch.attention_mask,
                              batch.inputs["image_grid_thw"], merge)
        want = reference_position_ids(model, {k: v for k, v in batch.inputs.items()
                                              if k != "position_ids"})
        assert ours is not None and torch.equal(ours, want)
        got = batch.inputs["position_ids"]
        assert got.dtype == want.dtype and torch.equal(got, want)
    # what it does not expect goes to HF: padding on the right, a grid too few
    batch = model.prepare_examples(exs)
    types, mask, grid = types_of(batch), batch.attention_mask, batch.inputs["image_grid_thw"]
    assert image_rope_ids(types.flip(1), mask.flip(1), grid, merge) is None
    assert image_rope_ids(types, mask, grid[:-1], merge) is None
