"""run_with_cache knows its size before it runs (issue #16, item 3): the estimate of every hook
point that fires equals the bytes it caches, on every family, and a cache that would not fit is
refused (or warned about) with the cheaper paths named."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAMILY_NAMES, grounded_examples

from corelens import InputError
from corelens.core import cache_budget


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_model):
    model = tiny_model(request.param)
    return model, model.prepare_examples(grounded_examples(request.param, 2))


def test_every_cached_decoder_hook_is_estimated_to_the_byte(setup):
    model, batch = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    est = cache_budget.estimate(model, model._names(None), *batch.input_ids.shape)
    fired = {n: cache[n].nbytes for n in est if n in cache.keys()}
    assert len(fired) > 0.9 * len(est)  # the rest are hook points this family never fires
    assert {n: est[n] for n in fired} == fired
    assert sum(est.values()) <= 1.1 * sum(fired.values())


def test_query_positions_and_logits_to_keep_shrink_the_estimate_as_they_shrink_the_cache(setup):
    model, batch = setup
    names = [n for n in model._names(None) if n.endswith(("hook_pattern", "unembed.hook_out"))]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names, positions="query",
                                        logits_to_keep=batch.logits_to_keep)
    rows = max(len(q) for q in batch.query_positions)
    est = cache_budget.estimate(model, names, *batch.input_ids.shape, rows=rows,
                                logits_rows=batch.logits_to_keep)
    assert {n: est[n] for n in cache.keys() if n in est} == {
        n: cache[n].nbytes for n in cache.keys() if n in est}
    full = cache_budget.estimate(model, names, *batch.input_ids.shape)
    assert sum(est.values()) < sum(full.values()) / 4


def test_a_cache_that_does_not_fit_is_refused_with_the_cheaper_paths(setup, monkeypatch):
    model, batch = setup
    need = sum(cache_budget.estimate(model, model._names(None), *batch.input_ids.shape).values())
    monkeypatch.setattr(cache_budget, "free_bytes", lambda device: need // 2)
    with pytest.raises(InputError) as err:
        model.run_with_cache(batch)
    msg = str(err.value)
    for fix in ('positions="query"', "names_filter=", "hook_attn_scores", "check_memory=False"):
        assert fix in msg
    assert "attention patterns" in msg and "logits" in msg  # where the bytes go
    monkeypatch.setattr(cache_budget, "free_bytes", lambda device: int(need * 1.5))
    with pytest.warns(cache_budget.CacheMemoryWarning, match="would hold about"):
        model.run_with_cache(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache_budget.CacheMemoryWarning)
        model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_post"))
        monkeypatch.setattr(cache_budget, "free_bytes", lambda device: 1)
        model.run_with_cache(batch, check_memory=False)
