"""The TransformerLens surface of HookedMLLM, one test per row of docs/tl_surface.md: each name
checked against the HF module it reads or a hand computation, with an image in the batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformer_lens.patching as tl_patching

from corelens import InputError, zoo
from corelens.core.tl_surface import BIAS_SHAPES, BRIDGE_ATTRIBUTES, BRIDGE_METHODS
from corelens.heads import head_name
from corelens.hook_names import decoder_hooks, is_vision_hook, vision_hooks

NAME = "toy-llava"


@pytest.fixture(scope="module")
def model():
    return zoo.load(NAME)


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare_examples(zoo.examples(NAME, 3, seed=11))


def _layer0(model):
    return model.hf_model.model.language_model.layers[0]


def test_the_documented_table_lists_every_forwarded_name():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tl_surface.md").read_text()
    for name in (*BRIDGE_ATTRIBUTES, *BRIDGE_METHODS):
        assert f"`{name}`" in doc, name


# --- weights and modules ------------------------------------------------------------------
def test_embedding_and_unembedding_are_the_hf_weights(model):
    assert torch.equal(model.W_E, model.hf_model.get_input_embeddings().weight)
    assert torch.equal(model.W_U, model.hf_model.lm_head.weight.T)
    assert model.b_U.shape == (model.cfg.d_vocab,) and not model.b_U.any()


def test_attention_weights_are_per_head_slices_of_the_projections(model):
    attn, dh = _layer0(model).self_attn, model.cfg.d_head
    for h in range(model.cfg.n_heads):
        rows = slice(h * dh, (h + 1) * dh)
        assert torch.equal(model.W_Q[0, h], attn.q_proj.weight[rows].T)
        assert torch.equal(model.W_K[0, h], attn.k_proj.weight[rows].T)
        assert torch.equal(model.W_V[0, h], attn.v_proj.weight[rows].T)
        assert torch.equal(model.W_O[0, h], attn.o_proj.weight[:, rows].T)
    qk = model.QK[0, 1].AB
    torch.testing.assert_close(qk, model.W_Q[0, 1] @ model.W_K[0, 1].T)
    torch.testing.assert_close(model.OV[0, 1].AB, model.W_V[0, 1] @ model.W_O[0, 1])


def test_mlp_weights_are_the_up_and_down_projections(model):
    mlp = _layer0(model).mlp
    assert torch.equal(model.W_in[0], mlp.up_proj.weight.T)
    assert torch.equal(model.W_out[0], mlp.down_proj.weight.T)


@pytest.mark.parametrize("name", sorted(BIAS_SHAPES))
def test_missing_biases_read_as_zeros_of_tl_shape(model, name):
    # toy-llava's Llama decoder has no biases: HookedTransformer gave zeros, so does corelens
    value = getattr(model, name)
    assert value.shape == tuple(getattr(model.cfg, d) for d in BIAS_SHAPES[name])
    assert not value.any()


def test_a_present_bias_is_the_checkpoints(tiny_model):
    model = tiny_model("qwen2_5_vl")  # Qwen2 decoder: q/k/v biases
    attn, dh = model.hf_model.model.language_model.layers[1].self_attn, model.cfg.d_head
    assert torch.equal(model.b_Q[1, 2], attn.q_proj.bias[2 * dh:3 * dh])


def test_modules_compute_the_logits(model, batch):
    assert len(model.blocks) == model.cfg.n_layers
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=[last])
        again = model.unembed(model.ln_final(cache[last]))
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)
    assert torch.equal(model.embed(batch.input_ids[:, :4]),
                       model.W_E[batch.input_ids[:, :4]])


def test_mod_dict_and_hook_points(model):
    assert model.mod_dict["blocks.0"] is model.blocks[0]
    assert model.mod_dict["blocks.1.hook_out"] is model.hook_dict["blocks.1.hook_resid_post"]
    points = list(model.hook_points())
    assert {id(p) for p in points} == {id(p) for p in model.hook_dict.values()}


def test_hook_dict_is_the_bridges_and_follows_its_table(model):
    """``hook_dict`` equals TransformerLens's (built afresh at every access), is rebuilt when a
    hook point is added or replaced (as attaching an SAE does), and a caller's edits to the
    returned dict do not reach the next one."""
    from transformer_lens.hook_points import HookPoint

    from corelens import compat

    def same(a, b):
        return list(a) == list(b) and all(a[n] is b[n] for n in a)

    assert same(model.hook_dict, model.bridge.hook_dict)
    mine = model.hook_dict
    mine.clear()
    assert same(model.hook_dict, model.bridge.hook_dict)
    table = compat.hook_registry(model.bridge)
    old = table["blocks.0.hook_out"]
    try:
        table["blocks.0.hook_out"] = point = HookPoint()
        assert model.hook_dict["blocks.0.hook_resid_post"] is point
        table["extra.hook_test"] = extra = HookPoint()
        assert model.hook_dict["extra.hook_test"] is extra
        assert same(model.hook_dict, model.bridge.hook_dict)
    finally:
        table["blocks.0.hook_out"] = old
        table.pop("extra.hook_test", None)
    assert model.hook_dict["blocks.0.hook_resid_post"] is old
    assert "extra.hook_test" not in model.hook_dict


def test_all_head_labels_use_the_head_label(model):
    n, h = model.cfg.n_layers, model.cfg.n_heads
    assert model.all_head_labels == [head_name((l, i)) for l in range(n) for i in range(h)]


# --- hooks -----------------------------------------------------------------------------------
def test_add_hook_reset_hooks_and_remove_all_hook_fns(model, batch):
    seen: list[str] = []
    model.add_hook("blocks.1.hook_resid_post", lambda a, hook: seen.append(hook.name))
    with torch.no_grad():
        model(batch)
        assert seen == ["blocks.1.hook_resid_post"]  # the TL alias, not blocks.1.hook_out
        model.reset_hooks()
        model(batch)
        model.add_hook(lambda n: n == "blocks.0.hook_resid_pre", lambda a, hook: seen.append(1))
        model.remove_all_hook_fns()
        model(batch)
    assert seen == ["blocks.1.hook_resid_post"]


def test_hook_name_is_the_name_asked_for(model, batch):
    seen: list[str] = []
    hooks = [("blocks.0.hook_resid_post", lambda a, hook: seen.append(hook.name)),
             # a filter that reaches blocks.1's point by its bridge name AND its alias: one call,
             # under the alias
             (lambda n: n in ("blocks.1.hook_out", "blocks.1.hook_resid_post"),
              lambda a, hook: seen.append(hook.name))]
    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=hooks)
        with model.hooks(fwd_hooks=hooks[:1]):
            model(batch)
    assert seen == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                    "blocks.0.hook_resid_post"]


def test_decoder_and_vision_filters_separate_the_tower(model, batch):
    suffix = [n for n in model.hook_dict if n.endswith("hook_z")]
    assert any(is_vision_hook(n) for n in suffix)  # the trap: a suffix catches the tower
    dec = [n for n in model.hook_dict if decoder_hooks("hook_z")(n)]
    assert dec == [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    vis = [n for n in model.hook_dict if vision_hooks("hook_z")(n)]
    assert vis and set(vis) | set(dec) == set(suffix)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=decoder_hooks("hook_z"))
    assert sorted(cache.keys()) == sorted(dec)


def test_forwards_fill_no_kv_cache_unless_asked(model, batch):
    """HF fills a KV cache by default that model(...), run_with_hooks and run_with_cache never
    return (~8% of a toy forward): off unless the caller asks; the logits are the same."""
    seen: list = []
    text_model = model.hf_model.model.language_model
    handle = text_model.register_forward_hook(
        lambda mod, args, out: seen.append(out.past_key_values))
    try:
        with torch.no_grad():
            plain = model(batch)
            model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_resid_post",
                                                    lambda a, hook: None)])
            model.run_with_cache(batch, names_filter="blocks.0.hook_resid_post")
            model.run_with_cache(batch, names_filter="blocks.0.hook_resid_post",
                                 stop_at_layer=2)  # TransformerLens's run_with_cache
            assert seen == [None, None, None]  # stop_at_layer stops before the output
            cached = model(batch, use_cache=True)
    finally:
        handle.remove()
    assert seen[-1] is not None and seen[-1].get_seq_length() == batch.seq_len
    assert torch.equal(plain, cached)


def _refuse(*a, **kw):
    raise AssertionError("TransformerLens's run_with_cache was called")


def _points_hooked(model) -> int:
    return sum(len(p.fwd_hooks) for p in {id(p): p for p in model.hook_dict.values()}.values())


@pytest.mark.parametrize("names_filter", [
    None,
    lambda n: n.endswith(("hook_pattern", "hook_resid_post")),  # aliases and the tower too
    "blocks.1.attn.hook_pattern",
    ["blocks.0.hook_resid_pre", "blocks.0.hook_in", "blocks.2.attn.hook_z"],  # alias + its point
], ids=["all", "callable", "str", "list"])
def test_run_with_cache_equals_transformerlens_run_with_cache(model, batch, names_filter,
                                                            monkeypatch):
    """corelens caches by itself (no per-call alias tables); the reference is TransformerLens's
    own run_with_cache on the same bridge: the same logits, the same tensors under every name
    asked for, and no hook left behind (one added beforehand stays)."""
    kept: list[int] = []
    model.add_hook("blocks.0.hook_resid_post", lambda a, hook: kept.append(1))
    try:
        before = _points_hooked(model)
        tl_run_with_cache = model.bridge.run_with_cache
        with torch.no_grad():
            with monkeypatch.context() as m:  # corelens's own path, not a fall-back to TL's
                m.setattr(model.bridge, "run_with_cache", _refuse)
                logits, cache = model.run_with_cache(batch, names_filter=names_filter)
            ids, kw = model._inputs(batch)
            ref_logits, ref = tl_run_with_cache(ids, names_filter=names_filter, **kw)
        assert _points_hooked(model) == before and len(kept) == 2
    finally:
        model.reset_hooks()
    assert torch.equal(logits, ref_logits)
    asked = (list(ref.keys()) if names_filter is None or callable(names_filter)
             else [names_filter] if isinstance(names_filter, str) else names_filter)
    assert sorted(cache.keys()) == sorted(asked) and len(asked) > 0
    for name in asked:
        assert torch.equal(cache[name], ref[name]), name


def test_run_with_cache_leaves_transformerlens_options_and_errors_to_it(model, batch):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=decoder_hooks("hook_resid_pre"),
                                        stop_at_layer=1)
        assert list(cache.keys()) == ["blocks.0.hook_resid_pre"]
        with pytest.raises(KeyError, match="matched no hook points"):
            model.run_with_cache(batch, names_filter=["blocks.0.hook_not_a_hook"])
        with pytest.warns(UserWarning, match="gated-off"):  # hook_result is off by default
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(
                ("blocks.0.attn.hook_result", "blocks.0.attn.hook_z")))
    assert list(cache.keys()) == ["blocks.0.attn.hook_z"]


# --- tokens ----------------------------------------------------------------------------------
def test_to_tokens_with_and_without_tl_arguments(model):
    tok = model.tokenizer
    plain = model.to_tokens("what color is it")
    assert plain[0].tolist() == tok("what color is it")["input_ids"]
    no_bos = model.to_tokens("what color is it", prepend_bos=False)
    assert no_bos[0].tolist() == tok("what color is it", add_special_tokens=False)["input_ids"]
    padded = model.to_tokens(["red", "what color is it"], padding_side="right")
    assert padded[0, -1] == tok.pad_token_id and padded.shape[0] == 2


def test_to_str_tokens_shapes_follow_transformerlens(model, batch):
    ids = batch.input_ids[:, :5]
    rows = model.to_str_tokens(ids)
    assert len(rows) == 3 and rows[1] == model.tokenizer.convert_ids_to_tokens(ids[1].tolist())
    one = model.to_str_tokens(ids[0])
    assert one == rows[0] and isinstance(one[0], str)
    assert model.to_str_tokens(["red", "blue"]) == [model.to_str_tokens("red"),
                                                    model.to_str_tokens("blue")]
    # a batch: image tokens carry their grid cell
    assert model.to_str_tokens(batch, example=1).count("<image>") == 0


def test_to_string_and_single_token(model):
    red = model.to_single_token("red")
    assert red == model.tokenizer.convert_tokens_to_ids("red")
    assert model.to_string(torch.tensor([red])) == model.tokenizer.decode([red])
    with pytest.raises(AssertionError, match="not a single token"):
        model.to_single_token("what color")
    assert model.get_token_position("color", "what color is it") == 2  # <s> what color


def test_tokens_to_residual_directions_are_unembedding_columns(model):
    red = model.to_single_token("red")
    assert torch.equal(model.tokens_to_residual_directions("red"), model.W_U[:, red])


def test_compatibility_mode_keeps_the_log_probs():
    model = zoo.load(NAME)  # a fresh copy: compatibility mode folds the weights in place
    batch = model.prepare_examples(zoo.examples(NAME, 2, seed=12))
    with torch.no_grad():
        ref = model(batch).log_softmax(-1)
        model.enable_compatibility_mode()
        got = model(batch).log_softmax(-1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


# --- images never dropped ------------------------------------------------------------------------
def test_token_ids_with_image_tokens_and_no_pixels_are_refused(model, batch):
    for run in (lambda x: model(x), lambda x: model.run_with_cache(x),
                lambda x: model.run_with_hooks(x), lambda x: model.generate(x, 1)):
        with pytest.raises(InputError, match="no pixel values.*MultimodalBatch"):
            run(batch.input_ids)
    with torch.no_grad():
        assert model(model.to_tokens("what color is it")).shape[0] == 1  # text ids still run


def test_transformerlens_patching_refuses_ids_and_equals_a_hand_patch_on_batches(model):
    """TL's own patching function on corelens batches with images, against one hand-written
    patch; and the silent-drop case (``batch.input_ids``) now raises."""
    clean = model.prepare_examples(zoo.examples(NAME, 2, seed=13))
    other = zoo.examples(NAME, 2, seed=14)
    corrupt = model.prepare_examples([replace(a, images=b.images)
                                      for a, b in zip(zoo.examples(NAME, 2, seed=13), other)])
    q = clean.last_prompt_positions
    answer = clean.input_ids[torch.arange(2), q + 1]

    def metric(logits):
        return logits[torch.arange(2), q, answer].mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        with pytest.raises(InputError, match="no pixel values"):
            tl_patching.get_act_patch_attn_head_out_all_pos(
                model, corrupt.input_ids, clean_cache, metric)
        got = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache,
                                                              metric)
        layer, head = 1, 2
        z = clean_cache[f"blocks.{layer}.attn.hook_z"]

        def patch(act, hook):
            act[:, :, head] = z[:, :, head]

        want = metric(model.run_with_hooks(
            corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)]))
    torch.testing.assert_close(got[layer, head], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["/nonexistent/folder", "./no/such/model", "~/nope",
                                  "runs/checkpoints/final"])
def test_a_missing_local_folder_is_named(path):
    from corelens import HookedMLLM

    with pytest.raises(InputError, match="no model folder at"):
        HookedMLLM.from_pretrained(path)
