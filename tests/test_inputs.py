"""Bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import noise_image

from corelens import HookedMLLM, InputError, LayoutError, UnknownFamilyError


def test_unknown_family_names_the_class(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, vocab_size=50)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnknownFamilyError, match="LlamaForCausalLM.*Supported HF classes"):
        HookedMLLM.from_pretrained(tmp_path)


def test_wrong_number_of_images_for_placeholders(tiny_model):
    model = tiny_model("llava")
    img = noise_image(60, 60, 0)
    with pytest.raises(InputError, match="example 0.*1 '<image>'.*2 image"):
        model.prepare([[img, img]], ["<image> what is the color ?"], chat_template=False)
    with pytest.raises(InputError, match="marks 2 image.*1 image"):
        model.prepare([img], ["<image> and <image> what is the color ?"])


def test_prompt_without_placeholder(tiny_model):
    model = tiny_model("llava")
    with pytest.raises(InputError, match="no image placeholder.*put '<image>' in the prompt"):
        model.prepare([noise_image(60, 60, 0)], ["what is the color ?"], chat_template=False)


def test_box_outside_image(tiny_model):
    model = tiny_model("llava")
    img = noise_image(80, 50, 0)
    with pytest.raises(InputError, match=r"example 0: evidence box .* outside image 0 of size "
                                         r"80x50 \(width x height\); boxes are \(x0, y0, x1, y1\)"):
        model.prepare([img], ["what ?"], boxes=[(70, 10, 90, 20)])
    with pytest.raises(InputError, match="empty: need x0 < x1"):
        model.prepare([img], ["what ?"], boxes=[(30, 10, 30, 20)])


def test_box_in_cropped_away_part(tiny_model):
    """LLaVA's centre crop drops the sides of a wide image: a box there has no tokens."""
    model = tiny_model("llava")
    img = noise_image(160, 40, 0)  # resized to 256x64, centre-cropped to 64x64
    batch = model.prepare([img], ["what ?"], boxes=[(0, 0, 20, 20)])
    with pytest.raises(LayoutError, match="overlaps no vision token.*cropped away"):
        batch.evidence_positions(0)


def test_answer_errors(tiny_model):
    model = tiny_model("llava")
    img = noise_image(60, 60, 0)
    with pytest.raises(InputError, match="example 0: the answer is empty"):
        model.prepare([img], ["what ?"], answers=[" "])
    with pytest.raises(InputError, match="2 answers for 1 prompts"):
        model.prepare([img], ["what ?"], answers=["a", "b"])


def test_non_image_input(tiny_model):
    model = tiny_model("llava")
    with pytest.raises(InputError, match="PIL images"):
        model.prepare([[torch.zeros(3, 4, 4)]], ["what ?"])
    with pytest.raises(InputError, match="cannot run the model on a dict"):
        model({"input_ids": 1})


def test_text_only_run(tiny_model):
    model = tiny_model("llava")
    logits, cache = model.run_with_cache("what is the color ?")
    assert logits.shape[:2] == (1, len(model.to_str_tokens("what is the color ?")))
    assert "blocks.0.attn.hook_pattern" in cache.keys()


def test_prepare_examples_keeps_evidence_and_distractors(tiny_model):
    from corelens import GroundedExample

    model = tiny_model("llava")
    ex = GroundedExample(images=[noise_image(64, 64, 0)], question="what is the color ?",
                         answer="red", boxes=[(0, 0, 16, 16)], distractors=[(32, 32, 48, 48)],
                         id="ex-7")
    batch = model.prepare_examples([ex])
    assert batch.ids == ["ex-7"]
    ev = batch.evidence_positions(0)
    (dis,) = batch.distractor_positions(0)
    assert len(ev) == 4 and len(dis) == 4 and not set(ev.tolist()) & set(dis.tolist())
    bad = GroundedExample(images=[noise_image(64, 64, 0)], question="q ?", answer="red",
                          boxes=[(0, 0, 16, 16)], distractors=[(60, 60, 70, 70)], id="ex-8")
    with pytest.raises(InputError, match=r"example 0 \(id 'ex-8'\): distractor box.*outside "
                                         r"image 0"):
        model.prepare_examples([bad])
