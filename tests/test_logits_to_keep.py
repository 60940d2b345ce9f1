"""Logits only where they are read (issue #16, item 3): evaluation, ablation and the patching
metrics run the unembedding on the final ``batch.logits_to_keep`` positions only, with the same
numbers as over the whole sequence."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import FAMILY_NAMES, grounded_examples, noise_image

from corelens import evaluate
from corelens.core.evaluate import logits_to_keep, rows_at, score_logits
from corelens.interventions.patching import answer_logprob, logit_diff, patch_heads


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_model):
    model = tiny_model(request.param)
    examples = grounded_examples(request.param, 3)  # answers of 1 and 2 tokens: padding differs
    return model, examples, model.prepare_examples(examples)


def unembed_positions(model, batch, **kw) -> int:
    seen = []
    with model.hooks(fwd_hooks=[("unembed.hook_out", lambda x, hook: seen.append(x.shape[1]))]):
        with torch.no_grad():
            model(batch, **kw)
    return seen[0]


def test_the_window_holds_every_query_position_and_no_more(setup):
    model, _, batch = setup
    k = batch.logits_to_keep
    first = min(int(q.min()) for q in batch.query_positions)
    assert k == batch.seq_len - first < batch.seq_len
    assert unembed_positions(model, batch, logits_to_keep=k) == k
    assert unembed_positions(model, batch) == batch.seq_len
    assert unembed_positions(model, batch, return_type=None) == 1  # nobody reads them


def test_trimmed_logits_score_exactly_as_full_ones(setup):
    model, _, batch = setup
    with torch.no_grad():
        full = model(batch)
        part = model(batch, logits_to_keep=batch.logits_to_keep)
    assert torch.equal(part, full[:, -batch.logits_to_keep:])
    for a, b in zip(score_logits(full, batch), score_logits(part, batch)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) \
            else torch.equal(a, b)
    ids = torch.tensor([int(t[0]) for t in batch.answer_tokens])
    wrong = (ids + 1) % model.cfg.d_vocab
    diff = logit_diff(ids, wrong)
    assert torch.equal(diff(full, batch), diff(part, batch))
    assert torch.equal(answer_logprob(full, batch), answer_logprob(part, batch))
    # a position outside the window is refused, not read from the wrong row
    with pytest.raises(ValueError, match="logits_to_keep"):
        rows_at(part, batch, 0, torch.tensor([0]))
    with torch.no_grad():
        last = model(batch, logits_to_keep=1)  # only the final position: not the answer's
    with pytest.raises(ValueError, match="logits_to_keep"):
        diff(last, batch)  # (an index from the end would read another position silently)


def test_built_in_metrics_trim_user_metrics_do_not(setup):
    _, _, batch = setup
    assert logits_to_keep(answer_logprob, batch) == batch.logits_to_keep
    assert logits_to_keep(logit_diff(torch.zeros(1), torch.zeros(1)), batch) \
        == batch.logits_to_keep
    assert logits_to_keep(lambda logits, b: logits[:, 0, 0], batch) == 0


def test_evaluate_and_patching_run_trimmed_with_unchanged_results(setup):
    model, examples, batch = setup
    seen = []
    hook = ("unembed.hook_out", lambda x, hook: seen.append(x.shape[1]))
    with model.hooks(fwd_hooks=[hook]):
        res = evaluate(model, examples, progress=False)
    assert set(seen) == {batch.logits_to_keep}
    with torch.no_grad():
        lp, ok, _ = score_logits(model(batch), batch)  # full logits, by hand
    assert torch.equal(res.logprobs, lp) and torch.equal(res.correct, ok)
    # patching: the sweep (trimmed logits) equals the same sweep read over full logits
    other = [replace(e, images=[noise_image(*im.size, 99 + i) for im in e.images])
             for i, e in enumerate(examples)]  # same layout, another image
    source, target = model.prepare_examples(other), batch
    seen.clear()
    with model.hooks(fwd_hooks=[hook]):
        trimmed = patch_heads(model, source, target, answer_logprob)
    assert seen and max(seen) == target.logits_to_keep < target.seq_len  # (1: caching runs)
    full = patch_heads(model, source, target, lambda logits, b: answer_logprob(logits, b))
    assert torch.allclose(trimmed, full, atol=1e-5, rtol=0)
