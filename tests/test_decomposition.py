"""Residual decompositions and logit attributions that add up at text AND vision positions.

TransformerLens's ``ActivationCache`` takes ``hook_embed`` (the token lookup: the ``<image>``
placeholder's row at every vision token) as the decoder's input, so its decompositions miss the
residual stream by the image features there; ``MLLMActivationCache`` (what
``HookedMLLM.run_with_cache`` returns) takes the merged input embeddings, adds Qwen3-VL's
DeepStack features as components, and folds the final norm's weight into ``logit_attrs``.

Every family decomposes exactly, Gemma 3 included: its sandwich norms normalise the attention
and MLP outputs before the residual add, so ``hook_attn_out`` / ``hook_mlp_out`` are already
the residual contributions, and a head's (a neuron's) share of the normalised output is taken
at the post-norm's cached scale -- the convention ``logit_attrs`` uses for the final norm -- so
heads, neurons and biases add up to ``hook_attn_out`` / ``hook_mlp_out`` too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import FAMILY_NAMES, grounded_examples
from transformer_lens.ActivationCache import ActivationCache

from corelens.core.cache import MLLMActivationCache
from corelens.errors import InputError
from corelens.hook_names import EMBED, FINAL_NORM_IN

TOL = 1e-5  # fp32




def _masks(batch):
    """(text, vision) masks over [batch, seq]: real text tokens and image-feature tokens."""
    vision = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for e in range(len(batch)):
        vision[e, batch.layout.vision_positions(e)] = True
    real = batch.attention_mask.bool().cpu()
    assert vision.any() and (real & ~vision).any()
    return real & ~vision, vision & real


@contextlib.contextmanager
def _random_norm_weights(model, seed=0):
    """Non-trivial weights in every norm (the tiny models' are all ones, or zeros for Gemma's
    ``1 + w``), so that a decomposition that forgot a norm's weight would not add up; restored
    afterwards (the tiny models are shared between tests)."""
    gen = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for mod in model.hf_model.modules():
            w = getattr(mod, "weight", None)
            if ("Norm" in type(mod).__name__ and isinstance(w, torch.Tensor) and w.ndim == 1
                    and all(w is not v for v, _ in saved)):  # a bridge and its HF module
                saved.append((w, w.detach().clone()))  # share one weight: perturb it once
                w.add_(0.5 * torch.randn(w.shape, generator=gen).to(w))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, old in saved:
                w.copy_(old)


def _run(model, batch, **kw):
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, **kw)
    assert isinstance(cache, MLLMActivationCache)
    return logits, cache


def _max_err(stack, target, mask):
    return float((stack.sum(0) - target).detach().abs()[mask].max())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decompositions_add_up_at_text_and_vision_positions(name, tiny_model):
    model = tiny_model(name)
    batch = model.prepare_examples(grounded_examples(name))
    text, vision = _masks(batch)
    with _random_norm_weights(model):
        logits, cache = _run(model, batch)
        n = model.cfg.n_layers
        for layer in (1, n, None):
            target = cache.residual(layer)
            ref = (cache[FINAL_NORM_IN] if layer in (n, None)
                   else cache[f"blocks.{layer}.hook_resid_pre"])
            assert torch.equal(target, ref)
            for stack in (cache.decompose_resid(layer),
                          cache.get_full_resid_decomposition(layer),
                          cache.get_full_resid_decomposition(layer, expand_neurons=False)):
                assert _max_err(stack, target, text) < TOL, (name, layer)
                assert _max_err(stack, target, vision) < TOL, (name, layer)
        # the MLP input of a middle layer too
        mid = cache.get_full_resid_decomposition(1, mlp_input=True)
        assert _max_err(mid, cache["blocks.1.hook_resid_mid"], text | vision) < TOL

        # the input component is the merged embeddings: the image features at vision positions
        stack, labels = cache.decompose_resid(return_labels=True)
        assert labels[0] == "embed" and torch.equal(stack[0], cache[EMBED])
        lookup = cache["hook_embed"]
        assert (stack[0] - lookup).abs()[vision].max() > 1e-3  # not the placeholder's row

        # logit attributions of every position's top token add up to its logit (text and
        # vision positions), through the final norm's (random) weight
        full = cache.get_full_resid_decomposition()
        tokens = logits.argmax(-1)
        attrs = cache.logit_attrs(full, tokens)
        b_u = model.bridge.b_U[tokens]
        want = logits.gather(-1, tokens[..., None])[..., 0]
        err = (attrs.sum(0) + b_u - want).abs()
        assert err[text].max() < 1e-4 and err[vision].max() < 1e-4, name
        coarse = cache.logit_attrs(cache.decompose_resid(), tokens).sum(0) + b_u
        assert (coarse - want).abs()[text | vision].max() < 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_logit_attrs_of_the_answer_sum_to_its_logit(name, tiny_model):
    model = tiny_model(name)
    batch = model.prepare_examples(grounded_examples(name))
    with _random_norm_weights(model, seed=1):
        logits, cache = _run(model, batch)
        stack, labels = cache.get_full_resid_decomposition(return_labels=True)
        assert len(labels) == stack.shape[0] and labels[-1] == "bias"
        rows = torch.arange(len(batch))
        query = torch.stack([q[0] for q in batch.query_positions])
        answer = torch.stack([a[0] for a in batch.answer_tokens])
        attrs = cache.logit_attrs(stack, answer)  # [component, batch, pos]
        got = attrs.sum(0)[rows, query] + model.bridge.b_U[answer]
        want = logits[rows, query, answer]
        assert torch.allclose(got, want, atol=1e-4), (name, got, want)
        # a logit difference adds up the same way
        other = (answer + 1) % model.cfg.d_vocab
        diff = cache.logit_attrs(stack, answer, incorrect_tokens=other).sum(0)[rows, query]
        want_diff = want - logits[rows, query, other]
        assert torch.allclose(diff + model.bridge.b_U[answer] - model.bridge.b_U[other],
                              want_diff, atol=1e-4)


def test_base_cache_misses_the_image_features(tiny_model):
    """What issue 19 reported: TransformerLens's decomposition (hook_embed as the input) is
    exact at text positions and off at vision positions."""
    model = tiny_model("llava")
    batch = model.prepare_examples(grounded_examples("llava"))
    text, vision = _masks(batch)
    _, cache = _run(model, batch)
    base = ActivationCache(cache.cache_dict, model.bridge)
    stack = ActivationCache.decompose_resid(base)
    assert _max_err(stack, cache[FINAL_NORM_IN], text) < TOL
    assert _max_err(stack, cache[FINAL_NORM_IN], vision) > 1e-2
    assert _max_err(cache.decompose_resid(), cache[FINAL_NORM_IN], vision) < TOL


def test_qwen3_vl_deepstack_components_are_there_and_needed(tiny_model):
    model = tiny_model("qwen3_vl")
    assert model.family.vision_side_inputs
    batch = model.prepare_examples(grounded_examples("qwen3_vl"))
    text, vision = _masks(batch)
    _, cache = _run(model, batch)
    for fn in (cache.decompose_resid, cache.get_full_resid_decomposition):
        stack, labels = fn(return_labels=True)
        side = [i for i, lab in enumerate(labels) if lab.endswith("_vision_in")]
        assert side, labels
        target = cache.residual()
        assert _max_err(stack, target, vision) < TOL
        rows = stack[side]
        assert rows.abs()[:, text].max() == 0  # only at vision positions
        assert rows.abs()[:, vision].max() > 1e-3
        keep = [i for i in range(len(labels)) if i not in side]
        assert _max_err(stack[keep], target, vision) > 1e-3  # without them: off
        assert _max_err(stack[keep], target, text) < TOL
    # the rows are the features added between layers, before the next layer reads them
    stack, labels = cache.decompose_resid(1, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "0_vision_in"]
    added = cache["blocks.1.hook_resid_pre"] - cache["blocks.0.hook_resid_post"]
    assert torch.equal(stack[3], added)
    # a cache without the residual hooks cannot tell the features apart: it refuses
    _, partial = _run(model, batch, names_filter=lambda n: n.endswith(("attn_out", "mlp_out"))
                      or n in (EMBED, FINAL_NORM_IN))
    with pytest.raises(KeyError, match="DeepStack"):
        partial.decompose_resid()


def test_positions_cache_decomposes_and_attributes(tiny_model):
    model = tiny_model("qwen2_vl")
    batch = model.prepare_examples(grounded_examples("qwen2_vl"))
    logits, full = _run(model, batch)
    for positions in ("vision", "query"):
        _, cache = _run(model, batch, positions=positions)
        assert cache.positions is not None and cache.position_mask is not None
        stack = cache.get_full_resid_decomposition()
        assert _max_err(stack, cache.residual(), cache.position_mask) < TOL
        idx = cache.positions
        assert torch.allclose(cache.residual(), full.residual().gather(
            1, idx[..., None].expand(*idx.shape, full.residual().shape[-1])), atol=1e-6)
    answer = torch.stack([a[0] for a in batch.answer_tokens])
    attrs = cache.logit_attrs(stack, answer).sum(0)  # query positions: [batch, q]
    rows = torch.arange(len(batch))
    want = logits[rows, cache.positions[:, 0], answer]
    assert torch.allclose(attrs[:, 0], want, atol=1e-4)
    sliced = cache.apply_slice_to_batch_dim(1)
    assert isinstance(sliced, MLLMActivationCache) and sliced.positions.shape == idx.shape[1:]


def test_transformer_lens_helpers_still_work(tiny_model):
    model = tiny_model("llava")
    batch = model.prepare_examples(grounded_examples("llava"))
    text, vision = _masks(batch)
    logits, cache = _run(model, batch)
    n = model.cfg.n_layers
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape[0] == n * model.cfg.n_heads and labels[0] == "L0H0"
    per_layer = heads.view(n, model.cfg.n_heads, *heads.shape[1:]).sum(1)
    for l in range(n):
        assert _max_err(per_layer[l][None], cache[f"blocks.{l}.hook_attn_out"], text | vision) < TOL
    with_rest = cache.stack_head_results(incl_remainder=True)
    assert _max_err(with_rest, cache[f"blocks.{n - 1}.hook_resid_post"], text | vision) < TOL
    # apply_ln_to_stack: the cached scale of the final norm, as TransformerLens applies it
    stack = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(stack)
    assert torch.allclose(scaled.sum(0), cache["ln_final.hook_normalized"], atol=1e-5)
    accum, labels = cache.accumulated_resid(return_labels=True, apply_ln=True)
    assert labels[-1] == "final_post" and accum.shape[0] == n + 1
    assert torch.allclose(accum[-1], cache["ln_final.hook_out"], atol=1e-5)
    neurons = cache.stack_neuron_results(n)
    assert neurons.shape[0] == n * model.cfg.d_mlp


def test_gemma3_heads_are_shares_of_the_normalised_output(tiny_model):
    """Sandwich norms: a head's result is its share of the post-attention norm's output at the
    cached scale; raw ``z W_O`` would not add up to hook_attn_out."""
    model = tiny_model("gemma3")
    assert model.family.sandwich_norms
    batch = model.prepare_examples(grounded_examples("gemma3"))
    text, vision = _masks(batch)
    with _random_norm_weights(model, seed=2):
        _, cache = _run(model, batch)
        heads = cache.stack_head_results(1)
        assert _max_err(heads, cache["blocks.0.hook_attn_out"], text | vision) < TOL
        raw = torch.einsum("bphd,hdm->hbpm", cache["blocks.0.attn.hook_z"],
                           model.bridge.blocks[0].attn.W_O)
        assert _max_err(raw, cache["blocks.0.hook_attn_out"], text | vision) > 1e-2
        neurons = cache.get_neuron_results(0)  # [batch, pos, d_mlp, d_model]
        assert (neurons.sum(-2) - cache["blocks.0.hook_mlp_out"]).abs().max() < TOL
        # the projected + normalised path agrees with the plain one
        direction = torch.randn(model.cfg.d_model)
        full = cache.get_full_resid_decomposition(apply_ln=True)
        folded = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=direction)
        assert torch.allclose(full @ direction, folded, atol=1e-4)


def test_logit_attrs_refuses_what_it_cannot_split(tiny_model):
    model = tiny_model("llava")
    batch = model.prepare_examples(grounded_examples("llava", n=1))
    _, cache = _run(model, batch)
    stack = cache.decompose_resid()
    weight = model.bridge.ln_final.weight
    old = weight.detach().clone()
    try:  # the final norm's weight changed after the run: the cached output disagrees
        with torch.no_grad():
            weight.mul_(2.0)
        with pytest.raises(InputError, match="final norm"):
            cache.logit_attrs(stack, 0)
    finally:
        with torch.no_grad():
            weight.copy_(old)
    cap = model.cfg.output_logits_soft_cap
    try:  # soft-capped logits are no sum of components
        model.cfg.output_logits_soft_cap = 30.0
        with pytest.raises(InputError, match="soft-caps"):
            cache.logit_attrs(stack, 0)
    finally:
        model.cfg.output_logits_soft_cap = cap
