"""Raw prompts (no chat template) and answers the tokenizer cannot spell (issue 19, items 5, 6).

A LLaVA folder whose processor has no chat template must still go through ``evaluate`` /
``score_heads`` / ``ablation_curve`` with prompts that carry the image token themselves, with the
layout read from the tokenised ids exactly as on the chat path; an answer that tokenises to
``<unk>`` must be refused instead of being scored as ``<unk>``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import noise_image

from corelens import GroundedExample, HookedMLLM, InputError, evaluate
from corelens.core.prepare import _check_answer

BOX = (0, (0, 0, 40, 25))
QUESTION = "what is the color of the square ?"
CHAT_PREFIX = "user :"  # SIMPLE_CHAT_TEMPLATE: "user : <image> {question}\nassistant :"


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    """The tiny LLaVA of the ``tiny_model("llava")`` fixture (same seed, so the same weights and
    tokenizer), saved with no chat template anywhere in its folder."""
    from corelens.zoo.tiny.llava import tiny_llava

    folder = tmp_path_factory.mktemp("llava-no-template")
    hf, proc = tiny_llava(folder, seed=0)
    proc.chat_template = None
    hf.save_pretrained(folder)
    proc.save_pretrained(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    for cfg in folder.glob("*.json"):
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and data.pop("chat_template", None) is not None:
            cfg.write_text(json.dumps(data))
    assert not any("chat_template" in f.name for f in folder.iterdir())
    assert not any("chat_template" in f.read_text() for f in folder.glob("*.json"))
    model = HookedMLLM.from_pretrained(folder)
    assert not model.processor.chat_template
    assert not model.family.has_chat_template(model.processor)
    return model


def _examples(n: int, raw: bool = True, question: str = f"<image> {QUESTION}",
              sizes=((80, 50), (40, 70))) -> list[GroundedExample]:
    return [GroundedExample([noise_image(*sizes[i % len(sizes)], i)],
                            question if i % 2 == 0 else question + " ?", "red blue" if i % 2
                            else "green", [BOX], id=f"r{i}", raw_prompt=raw) for i in range(n)]


def _image_token_positions(batch, tid: int, e: int) -> torch.Tensor:
    return (batch.input_ids[e] == tid).nonzero().flatten()


def test_the_chat_path_fails_cleanly_without_template(raw_model):
    """Before: transformers' "Cannot use apply_chat_template ..." ValueError; now an
    ``InputError`` naming the example, the problem and the three fixes."""
    ex = replace(_examples(1)[0], question=QUESTION, raw_prompt=False, id="plain")
    with pytest.raises(InputError, match=r"example 0 \(id 'plain'\): the processor has no chat "
                       r"template and the prompt holds no '<image>'.*raw_prompt.*chat template"):
        raw_model.prepare_examples([ex])
    with pytest.raises(InputError, match="no chat template"):
        evaluate(raw_model, [ex], progress=False)
    with pytest.raises(InputError, match="has no chat template.*raw_prompt"):
        raw_model.family.build_prompt(raw_model.processor, QUESTION, 1)
    # a raw prompt still needs one image token per image
    with pytest.raises(InputError, match="raw prompt has 2 '<image>' but 1 image"):
        raw_model.prepare_examples([replace(ex, question=f"<image> <image> {QUESTION}",
                                            raw_prompt=True)])


def test_raw_layout_is_where_the_image_tokens_are(raw_model):
    """Batched (left padding, two image sizes, two prompt lengths): every example's vision
    positions are exactly the positions of the image token ids in its input_ids."""
    examples = _examples(4)
    batch = raw_model.prepare_examples(examples, raw_prompts=[True] * 4)
    tid = raw_model.family.image_token_id(raw_model.hf_model.config, raw_model.processor)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # padding is exercised
    for e, ex in enumerate(examples):
        pos = batch.layout.vision_positions(e)
        assert torch.equal(pos, _image_token_positions(batch, tid, e))
        assert pos.numel() == 64
        assert batch.prompts[e] == f"{ex.question} {ex.answer}"
        n_ans = len(raw_model.tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
        assert batch.answer_tokens[e].numel() == n_ans
        assert batch.evidence_positions(e).numel() > 0


def test_raw_equals_chat_path(raw_model, tiny_model):
    """The same model with a chat template: the chat path's prompt written out raw gives the very
    same ids, layout, query positions and logits; a shorter raw prompt shifts the vision positions
    by the tokens it leaves out."""
    chat = tiny_model("llava")
    assert chat.family.has_chat_template(chat.processor)
    img = noise_image(80, 50, 0)
    q = f"<image> {QUESTION}"
    ref = chat.prepare([img], [QUESTION], ["red"], [BOX[1]])
    full = chat.family.build_prompt(chat.processor, QUESTION, 1)
    assert full.startswith(CHAT_PREFIX)
    for model, kw in ((raw_model, {}), (chat, {"raw_prompts": [True]}),
                      (chat, {"chat_template": False})):
        got = model.prepare([img], [full], ["red"], [BOX[1]], **kw)
        assert torch.equal(got.input_ids, ref.input_ids)
        assert torch.equal(got.layout.vision_positions(0), ref.layout.vision_positions(0))
        assert torch.equal(got.evidence_positions(0), ref.evidence_positions(0))
        assert torch.equal(got.query_positions[0], ref.query_positions[0])
        assert torch.equal(got.answer_tokens[0], ref.answer_tokens[0])
    with torch.no_grad():
        assert torch.allclose(raw_model(got), chat(ref), atol=1e-5)

    short = raw_model.prepare([img], [q], ["red"], [BOX[1]])
    shift = len(raw_model.tokenizer(CHAT_PREFIX, add_special_tokens=False)["input_ids"])
    assert shift > 0
    assert torch.equal(short.layout.vision_positions(0) + shift, ref.layout.vision_positions(0))
    assert torch.equal(short.evidence_positions(0) + shift, ref.evidence_positions(0))
    assert torch.equal(short.answer_tokens[0], ref.answer_tokens[0])
    # the chat model given the raw flag does not wrap the prompt in its template
    flagged = chat.prepare([img], [q], ["red"], [BOX[1]], raw_prompts=True)
    assert torch.equal(flagged.input_ids, short.input_ids)


def test_example_flag_reaches_prepare_on_a_model_with_template(tiny_model, monkeypatch):
    import corelens.core.model as core_model

    seen: dict = {}
    real = core_model._prepare

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(core_model, "_prepare", spy)
    chat = tiny_model("llava")
    ex = _examples(1)[0]
    got = chat.prepare_examples([ex])
    if "raw_prompts" not in seen:
        pytest.skip("HookedMLLM.prepare_examples does not pass GroundedExample.raw_prompt on to "
                    "prepare yet (core/model.py)")
    assert got.prompts == [f"{ex.question} {ex.answer}"]
    want = chat.prepare(ex.images, [ex.question], [ex.answer], [ex.boxes], raw_prompts=True)
    assert torch.equal(got.input_ids, want.input_ids)
    # without the flag, the chat template wraps the question
    assert chat.prepare_examples([replace(ex, raw_prompt=False)]).prompts[0].startswith(
        CHAT_PREFIX)


def test_automatic_fallback_without_template(raw_model):
    """No chat template, the question holds the image token: used verbatim, flag or not."""
    flagged = raw_model.prepare_examples(_examples(2, raw=True), raw_prompts=[True, True])
    auto = raw_model.prepare_examples(_examples(2, raw=False))
    assert auto.prompts == flagged.prompts
    assert torch.equal(auto.input_ids, flagged.input_ids)
    for e in range(2):
        assert torch.equal(auto.layout.vision_positions(e), flagged.layout.vision_positions(e))


def test_study_runs_on_raw_prompts(raw_model):
    from corelens import ablation_curve
    from corelens.scores.ram import score_heads

    examples = _examples(4)
    res = evaluate(raw_model, examples, batch_size=3, progress=False)
    assert res.ids == [ex.id for ex in examples]
    assert torch.isfinite(res.logprobs).all() and (res.logprobs < 0).all()
    auto = evaluate(raw_model, _examples(4, raw=False), batch_size=3, progress=False)
    assert torch.allclose(auto.logprobs, res.logprobs, atol=1e-5)

    scores = score_heads(raw_model, examples, "ram", batch_size=2, progress=False)
    L, H = raw_model.cfg.n_layers, raw_model.cfg.n_heads
    assert scores.scores.shape == (L, H) and torch.isfinite(scores.scores).all()
    assert (scores.scores > 0).any()

    curve = ablation_curve(raw_model, examples, scores, fracs=(0.25,), seeds=(0,),
                           batch_size=2, progress=False)
    d = curve.to_dict("logprob")
    assert d["none"] == pytest.approx(float(res.logprobs.mean()), abs=1e-4)
    assert len(d["top"]) == 1


def test_raw_prompt_jsonl_round_trip(tmp_path):
    from corelens import load_jsonl, save_jsonl

    examples = _examples(2)
    examples[1].raw_prompt = False
    path = save_jsonl(examples, tmp_path / "raw.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["raw_prompt"] is True and "raw_prompt" not in lines[1]
    back = load_jsonl(path)
    assert [ex.raw_prompt for ex in back] == [True, False]
    assert [ex.question for ex in back] == [ex.question for ex in examples]
    lines[0]["raw_prompt"] = "yes"
    path.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(InputError, match="line 1.*'raw_prompt' must be true or false"):
        load_jsonl(path)


@pytest.fixture(scope="module")
def toy():
    from corelens import zoo

    return zoo.load("toy-llava"), zoo.examples("toy-llava", 2)


def test_unknown_answer_is_refused(toy):
    model, examples = toy
    bad = [examples[0], replace(examples[1], answer="zebra-purple")]
    assert model.tokenizer.unk_token_id in model.tokenizer("zebra-purple")["input_ids"]
    msg = (rf"example 1 \(id '{bad[1].id}'\): the answer 'zebra-purple'.*'<unk>'.*"
           r"Fix: write the answer in words of the model's vocabulary")
    with pytest.raises(InputError, match=msg):
        model.prepare_examples(bad)
    with pytest.raises(InputError, match="zebra-purple"):
        evaluate(model, bad, progress=False)


def test_unknown_word_in_question_still_works(toy):
    model, examples = toy
    odd = [replace(ex, question=ex.question + " zebra-purple ?") for ex in examples]
    batch = model.prepare_examples(odd)
    assert (batch.input_ids == model.tokenizer.unk_token_id).any()  # the prompt has <unk>s
    res = evaluate(model, odd, progress=False)
    assert torch.isfinite(res.logprobs).all()


def test_answer_must_round_trip():
    """A tokenizer whose tokens decode to something else than the answer (no unk id involved)."""

    class Lowercasing:
        unk_token_id = None

        def decode(self, ids, skip_special_tokens=False):
            return "red"

    with pytest.raises(InputError, match=r"example 3 \(id 'x'\): the answer 'Red' does not "
                       r"survive tokenisation.*'red'"):
        _check_answer(Lowercasing(), torch.tensor([5]), "Red", "example 3 (id 'x')")
    _check_answer(Lowercasing(), torch.tensor([5]), " red ", "example 0")  # whitespace is fine
