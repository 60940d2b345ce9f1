"""SAEs (corelens.saes): SAELens's format, semantics and splicing, on the shipped toy LLaVA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import corelens.zoo as zoo
from corelens.errors import InputError
from corelens.saes import (
    SAE,
    JumpReLUSAE,
    SAEConfig,
    TopKSAE,
    add_sae,
    attached_saes,
    reset_saes,
    run_with_cache_with_saes,
    run_with_hooks_with_saes,
    run_with_saes,
    saes,
)

DECODER = "blocks.1.hook_resid_post"  # d_model 128
VISION = "vision_encoder.pre_layernorm.hook_out"  # the tower's width, 64: the LM reads it
PROJECTOR = "vision_projector.hook_out"  # 128, the vision tokens' LM inputs
POINTS = [(DECODER, 128), (VISION, 64), (PROJECTOR, 128)]


@pytest.fixture(scope="module")
def model():
    return zoo.load("toy-llava")


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))


@pytest.fixture(scope="module")
def base(model, batch):
    with torch.no_grad():
        return model(batch)


def random_sae(d_in: int, hook_name: str | None, architecture: str = "standard",
               seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.create(d_in, 2 * d_in, hook_name, architecture, **cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 1)
    return sae


@pytest.mark.parametrize("name,d_in", POINTS, ids=["decoder", "vision-tower", "projector"])
def test_a_spliced_sae_with_its_error_term_changes_nothing_and_without_it_is_the_hand_edit(
        model, batch, base, name, d_in):
    sae = random_sae(d_in, name)
    with torch.no_grad():
        kept = run_with_saes(model, batch, [sae], use_error_term=True)
        spliced = model.run_with_saes(batch, [sae])
        by_hand = model.run_with_hooks(
            batch, fwd_hooks=[(name, lambda act, hook: sae.decode(sae.encode(act)))])
    assert (kept - base).abs().max() <= 1e-5
    assert (spliced - base).abs().max() > 1e-2
    assert (spliced - by_hand).abs().max() <= 1e-5
    assert attached_saes(model) == {} and not sae.use_error_term  # attached for the call only


def test_editing_features_under_the_error_term_edits_the_forward_by_the_decoder_difference(
        model, batch, base):
    sae = random_sae(128, DECODER)
    feature = 3

    def ablate(acts, hook):
        acts[..., feature] = 0
        return acts

    def by_hand(act, hook):
        f = sae.encode(act)
        g = f.clone()
        g[..., feature] = 0
        return act + sae.decode(g) - sae.decode(f)

    with torch.no_grad():
        edited = run_with_hooks_with_saes(
            model, batch, [sae], fwd_hooks=[(DECODER + ".hook_sae_acts_post", ablate)],
            use_error_term=True)
        expected = model.run_with_hooks(batch, fwd_hooks=[(DECODER, by_hand)])
    assert (edited - base).abs().max() > 1e-3
    assert (edited - expected).abs().max() <= 1e-4


def test_features_per_vision_token_are_the_encoding_of_the_cached_activation(model, batch):
    sae = random_sae(128, DECODER)
    feats = DECODER + ".hook_sae_acts_post"
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(batch, [sae], names_filter=[feats],
                                                  positions="vision", use_error_term=True)
        _, clean = model.run_with_cache(batch, names_filter=[DECODER], positions="vision")
        expected = sae.encode(clean[DECODER])
    got = cache[feats]
    n_vision = [len(batch.layout.vision_positions(e)) for e in range(len(batch))]
    assert got.shape == (len(batch), max(n_vision), sae.cfg.d_sae)
    mask = cache.position_mask
    assert mask.sum(1).tolist() == n_vision
    torch.testing.assert_close(got[mask], expected[clean.position_mask], rtol=0, atol=1e-5)
    assert (got[mask] > 0).any()


def test_features_in_the_vision_tower_are_the_encoding_of_the_tower_activation(model, batch):
    sae = random_sae(64, VISION)
    with torch.no_grad():
        _, cache = run_with_cache_with_saes(model, batch, sae, use_error_term=True,
                                            names_filter=lambda n: n.startswith(VISION))
        _, clean = model.run_with_cache(batch, names_filter=[VISION])
    assert set(cache.keys()) >= {f"{VISION}.{h}" for h in (
        "hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
        "hook_sae_error", "hook_sae_output")}
    torch.testing.assert_close(cache[f"{VISION}.hook_sae_input"], clean[VISION])
    torch.testing.assert_close(cache[f"{VISION}.hook_sae_acts_post"], sae.encode(clean[VISION]))
    torch.testing.assert_close(cache[VISION], clean[VISION], rtol=0, atol=0)  # error term on


def test_an_attached_sae_is_a_hook_point_of_the_model_until_reset(model, batch, base):
    sae = random_sae(128, DECODER)
    feats = DECODER + ".hook_sae_acts_post"
    seen = []
    model.add_sae(sae)
    try:
        assert feats in model.hook_dict and attached_saes(model) == {DECODER: sae}
        with torch.no_grad():
            spliced = model(batch)
            model.reset_hooks()  # the splice is not an ordinary hook: it stays
            assert torch.equal(model(batch), spliced)
            zeroed = model.run_with_hooks(batch, fwd_hooks=[
                (feats, lambda acts, hook: seen.append(hook.name) or acts * 0)])
            _, cache = model.run_with_cache(batch, names_filter=[feats])
        assert seen == [feats]
        assert not torch.equal(zeroed, spliced)
        assert cache[feats].shape[-1] == sae.cfg.d_sae
    finally:
        model.reset_saes()
    assert not any("hook_sae" in n for n in model.hook_dict)
    assert attached_saes(model) == {} and sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    with torch.no_grad():
        assert torch.equal(model(batch), base)
        with pytest.warns(UserWarning, match="no SAE is attached"):
            model.reset_saes(DECODER)  # nothing there: a warning, as SAELens
    assert len(sae.hook_sae_acts_post.fwd_hooks) == 0


def test_the_saes_context_restores_what_it_replaced(model, batch):
    first, second = random_sae(128, DECODER, seed=1), random_sae(128, DECODER, seed=2)
    add_sae(model, first, use_error_term=True)
    try:
        with saes(model, [second], use_error_term=False):
            assert attached_saes(model) == {DECODER: second} and not second.use_error_term
        assert attached_saes(model) == {DECODER: first} and first.use_error_term
        with model.saes(second):  # the method, and one SAE given bare
            assert attached_saes(model) == {DECODER: second}
        assert attached_saes(model) == {DECODER: first}
    finally:
        reset_saes(model)
    assert attached_saes(model) == {} and first.use_error_term is False


def test_topk_keeps_exactly_k_features(model, batch):
    sae = random_sae(128, DECODER, "topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: ReLU drops none of the k
        _, cache = run_with_cache_with_saes(model, batch, [sae],
                                            names_filter=[DECODER + ".hook_sae_acts_pre",
                                                          DECODER + ".hook_sae_acts_post"])
    pre, post = cache[DECODER + ".hook_sae_acts_pre"], cache[DECODER + ".hook_sae_acts_post"]
    assert ((post != 0).sum(-1) == 5).all()
    kept = post.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(kept, pre.topk(5, dim=-1).indices.sort(-1).values)
    torch.testing.assert_close(post.gather(-1, kept), pre.gather(-1, kept))
    x = torch.randn(7, 128)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        assert (sae.encode(x) == 0).all()  # the top k are ReLU'd too
        rescaled = random_sae(128, None, "topk", k=4, rescale_acts_by_decoder_norm=True)
        norms = rescaled.W_dec.norm(dim=-1)
        pre = rescaled.hidden_pre(x) * norms
        f = rescaled.encode(x)
        idx = pre.topk(4, dim=-1).indices
        torch.testing.assert_close(f.gather(-1, idx), pre.gather(-1, idx).relu())
        torch.testing.assert_close(rescaled.decode(f), (f / norms) @ rescaled.W_dec
                                   + rescaled.b_dec)


def test_jumprelu_zeroes_what_is_at_or_below_its_threshold_and_keeps_the_rest_whole():
    sae = random_sae(16, None, "jumprelu")
    x = torch.randn(50, 16)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0, 2, 32))
        pre = sae.hidden_pre(x)
        f = sae.encode(x)
        sae.threshold[5] = 1e9
        off = sae.encode(x)
    above = pre > torch.linspace(0, 2, 32)
    assert torch.equal(f, torch.where(above, pre, torch.zeros_like(pre)))
    assert (f[above] > torch.linspace(0, 2, 32).expand_as(pre)[above]).all()  # no shift
    assert above.any() and (~above & (pre > 0)).any()  # both sides of a threshold occur
    assert (off[:, 5] == 0).all() and torch.equal(off[:, :5], f[:, :5])


@pytest.mark.parametrize("architecture,cfg", [
    ("standard", {}), ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}), ("standard", {"normalize_activations": "layer_norm"}),
    ("standard", {"normalize_activations": "constant_norm_rescale",
                  "apply_b_dec_to_input": False}),
], ids=["standard", "topk", "jumprelu", "layer_norm", "constant_norm"])
def test_save_then_load_is_bit_exact_in_saelens_format(tmp_path, architecture, cfg):
    sae = random_sae(32, DECODER, architecture, **cfg)
    weights, cfg_path = sae.save(tmp_path / "sae")
    assert (weights.name, cfg_path.name) == ("sae_weights.safetensors", "cfg.json")
    written = json.loads(cfg_path.read_text())
    expected = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata", "architecture"}
    if architecture == "topk":
        expected |= {"k", "rescale_acts_by_decoder_norm"}
    assert set(written) == expected and written["architecture"] == architecture
    assert written["metadata"]["hook_name"] == DECODER
    assert int(written["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "jumprelu"
                                                    else set())
    assert set(load_file(str(weights))) == names
    back = SAE.load(tmp_path / "sae")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
        sae.use_error_term = True
        assert torch.equal(sae(x), x)  # every normalisation: the error term gives x back


def test_a_folder_written_as_saelens_writes_it_loads(tmp_path):
    torch.manual_seed(0)
    d_in, d_sae = 128, 64
    w = {"W_enc": torch.randn(d_in, d_sae), "b_enc": torch.randn(d_sae),
         "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in),
         "threshold": torch.rand(d_sae)}
    folder = tmp_path / "from_saelens"
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    with open(folder / "cfg.json", "w") as f:  # sae_lens 6: SAE.save_model's json.dump
        json.dump({"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cuda",
                   "apply_b_dec_to_input": True, "normalize_activations": "none",
                   "reshape_activations": "none",
                   "metadata": {"sae_lens_version": "6.18.0",
                                "sae_lens_training_version": "6.18.0",
                                "model_name": "toy-llava", "hook_name": DECODER,
                                "hook_head_index": None, "prepend_bos": True,
                                "context_size": 128, "dataset_path": "x",
                                "model_from_pretrained_kwargs": {}},
                   "architecture": "jumprelu"}, f)
    sae = SAE.load(folder)
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.metadata.hook_name == DECODER
    assert sae.cfg.metadata.model_name == "toy-llava" and sae.device.type == "cpu"
    x = torch.randn(4, d_in)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.where(pre > w["threshold"], pre.relu(), torch.zeros_like(pre))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(sae(x), expected @ w["W_dec"] + w["b_dec"])


def test_a_pre_6_saelens_folder_loads(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"W_enc": torch.randn(8, 16), "b_enc": torch.randn(16),
               "W_dec": torch.randn(16, 8), "b_dec": torch.randn(8),
               "scaling_factor": torch.ones(16)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2", "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
        "d_in": 8, "d_sae": 16, "dtype": "torch.float32", "device": "cpu",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "normalize_activations": False, "finetuning_scaling_factor": False}))
    sae = SAE.load(folder, dtype=torch.float64)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 3 and sae.dtype == torch.float64
    assert sae.cfg.hook_name == "blocks.0.hook_resid_pre"
    assert sae.cfg.normalize_activations == "none" and sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        assert ((sae.encode(torch.randn(10, 8, dtype=torch.float64)) != 0).sum(-1) <= 3).all()
    sae.save(tmp_path / "new")  # re-saved in the 6.x format: the metadata keeps the hook
    cfg = json.loads((tmp_path / "new" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_pre" and cfg["k"] == 3


def test_an_sae_on_hook_z_flattens_the_heads(model, batch, base):
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[name])
    heads, d_head = cache[name].shape[-2:]
    sae = random_sae(heads * d_head, name, reshape_activations="hook_z")
    with torch.no_grad():
        kept = run_with_saes(model, batch, [sae], use_error_term=True)
        spliced = run_with_saes(model, batch, [sae])
        assert sae(cache[name]).shape == cache[name].shape
    assert (kept - base).abs().max() <= 1e-5 and (spliced - base).abs().max() > 1e-3


def test_clear_errors(model, batch, tmp_path):
    with pytest.raises(InputError, match="no hook point 'blocks.1.hook_resid_pots'.*mean"):
        add_sae(model, random_sae(128, "blocks.1.hook_resid_pots"))
    with pytest.raises(InputError, match="names no hook point"):
        add_sae(model, random_sae(128, None))
    wrong = random_sae(64, DECODER)
    with pytest.raises(InputError, match=r"d_in=64.*width 128"):
        with torch.no_grad():
            run_with_saes(model, batch, [wrong])
    assert attached_saes(model) == {}  # the failed call left nothing behind
    with pytest.raises(InputError, match="lacks cfg.json"):
        SAE.load(tmp_path)
    with pytest.raises(InputError, match="not supported"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(InputError, match="k must be"):
        SAE.create(4, 8, architecture="topk", k=9)
    sae = random_sae(32, DECODER)
    sae.save(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "cfg.json").read_text())
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(InputError, match="do not fit"):
        SAE.load(tmp_path / "bad")
