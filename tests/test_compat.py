"""The version contract: every private TransformerLens / transformers / torch name corelens
touches lives in corelens/compat.py, exists in the installed libraries with the signature
corelens expects, and an upgrade that drops one fails loudly, naming it."""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILY_NAMES, noise_image
from PIL import Image
from transformer_lens.model_bridge.generalized_components.position_embedding_hooks_mixin import (
    PositionEmbeddingHooksMixin,
)
from transformers.cache_utils import Cache, DynamicCache

from corelens import HookedMLLM, compat
from corelens.errors import CorelensError

SRC = Path(compat.__file__).parent


def test_every_private_name_exists_with_its_signature():
    assert len(compat.PRIVATE_NAMES) >= 10
    assert compat.problems() == []
    compat.require()


def test_no_private_name_is_used_outside_compat():
    """A private name used elsewhere escapes the contract: grep every other module for each
    private name the contract lists (and for the bridge's forward-replacement trick)."""
    names = {p.name for p in compat.PRIVATE_NAMES if p.name.startswith("_")
             and not p.name.startswith("__")}
    names |= {"_update_kv_cache", "_bridge_builder", "_attn_implementation", "_hf_hook"}
    pattern = re.compile(r"\.(%s)\b|\b(%s)\b" % ("|".join(names), "|".join(names)))
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or "object.__setattr__" in line:
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert offenders == []


def test_a_missing_private_name_fails_loudly(monkeypatch):
    monkeypatch.delattr(PositionEmbeddingHooksMixin, "_apply_position_embedding_hooks")
    found = compat.problems()
    assert len(found) == 1 and "_apply_position_embedding_hooks is gone" in found[0]
    with pytest.raises(CorelensError, match="_apply_position_embedding_hooks is gone"):
        compat.require()


def test_a_changed_signature_fails_loudly(monkeypatch):
    def update(self, key_states, value_states, *args, **kwargs):  # layer_idx dropped
        raise AssertionError("never called")

    monkeypatch.setattr(Cache, "update", update)
    found = compat.problems()
    assert len(found) == 1 and "Cache.update" in found[0] and "layer_idx" in found[0]


def test_building_a_model_refuses_changed_internals(monkeypatch, tiny_folder):
    monkeypatch.delattr(PositionEmbeddingHooksMixin, "_apply_position_embedding_hooks")
    with pytest.raises(CorelensError, match="requirements.lock"):
        HookedMLLM.from_pretrained(tiny_folder("llava"))


class _Attn:
    layer_idx = 1


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_kv_cache_is_updated_under_either_kwarg_name(name):
    """transformers >= 5.24 hands attention ``cache=``, older releases ``past_key_values=``:
    both must append to the cache (a skipped update decodes every step on itself alone)."""
    cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    cache.update(k0, v0, 0)  # layer 0 filled, so layer 1 is a real second layer
    cache.update(k0, v0, 1)
    k1, v1 = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    k, v = compat.update_kv_cache(_Attn(), k1, v1, {name: cache, "use_cache": True})
    assert torch.equal(k, torch.cat([k0, k1], 2)) and torch.equal(v, torch.cat([v0, v1], 2))
    assert cache.get_seq_length(1) == 6 and cache.get_seq_length(0) == 5
    assert compat.kv_cache({name: cache}) is cache


def test_no_cache_leaves_keys_alone():
    k = torch.zeros(1, 1, 3, 2)
    out_k, out_v = compat.update_kv_cache(_Attn(), k, k, {"use_cache": False})
    assert out_k is k and out_v is k


def test_versions_name_the_libraries():
    v = compat.versions()
    assert set(v) == {"torch", "transformers", "transformer_lens"}
    assert v["transformers"] == transformers.__version__


def test_corelens_adapters_register_explicitly_once(tiny_model):
    """The adapters corelens adds are registered by ``register_adapters`` (which HookedMLLM
    calls), never replacing one TransformerLens already has; a second call changes nothing."""
    from transformer_lens.factories.architecture_adapter_factory import (
        ArchitectureAdapterFactory,
    )

    from corelens.families.adapters import ADAPTERS, register_adapters

    tiny_model("internvl")  # building a bridge registers them
    for name, adapter in ADAPTERS.items():
        assert ArchitectureAdapterFactory._adapters[name] is adapter
    before = dict(ArchitectureAdapterFactory._adapters)
    register_adapters()
    assert ArchitectureAdapterFactory._adapters == before
    sentinel = type("Sentinel", (), {})
    compat.register_tl_adapter("LlavaForConditionalGeneration", sentinel)
    assert ArchitectureAdapterFactory._adapters["LlavaForConditionalGeneration"] is not sentinel


def test_hook_registry_is_the_table_hook_dict_reads(tiny_model):
    model = tiny_model("llava")
    table = compat.hook_registry(model.bridge)
    assert table["blocks.0.hook_resid_pre"] is model.hook_dict["blocks.0.hook_resid_pre"]

    class Broken:
        _hook_registry = None

    with pytest.raises(CorelensError, match="_hook_registry"):
        compat.hook_registry(Broken())


def test_replace_and_restore_forward_swap_a_bridge_components_forward(tiny_model):
    """The bridge's components are nn.Modules whose attribute setting TransformerLens
    intercepts: the instance forward goes in and comes out without touching the class."""
    model = tiny_model("llava")
    block = model.bridge.blocks[0]
    x = torch.randn(1, 3, model.cfg.d_model)
    compat.replace_forward(block, lambda self, *a, **kw: "replaced")
    assert block(x) == "replaced" and "forward" not in vars(model.bridge.blocks[1])
    compat.restore_forward(block)
    assert "forward" not in vars(block)
    compat.restore_forward(block)  # restoring twice is a no-op
    assert block.forward.__func__ is type(block).forward


def _leaf_bridges(model):
    from transformer_lens.model_bridge.generalized_components.embedding import EmbeddingBridge
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
    from transformer_lens.model_bridge.generalized_components.normalization import (
        NormalizationBridge,
    )

    kinds = (LinearBridge, NormalizationBridge, EmbeddingBridge)
    return [m for m in model.bridge.modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def _every_call_on_tls_path():
    """A forward hook on every module (torch's global table): each bridge takes TL's own call."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_direct_leaf_calls_give_tls_results_bit_for_bit(tiny_model, family, monkeypatch):
    """Every linear, norm and embedding bridge of TL's exact class gets its direct subclass
    (``isinstance`` still holds); the logits, and every cached activation, equal the same
    model's with every call on TransformerLens's path."""
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

    tl_calls = []
    real = LinearBridge.forward
    monkeypatch.setattr(LinearBridge, "forward",
                        lambda self, *a, **k: tl_calls.append(1) or real(self, *a, **k))
    model = tiny_model(family)
    leaves = _leaf_bridges(model)
    direct = [m for m in leaves if type(m).__name__.startswith("Direct")]
    assert any(isinstance(m, compat.DirectLinearBridge) for m in leaves)
    assert any(isinstance(m, compat.DirectEmbeddingBridge) for m in leaves)
    assert len(direct) == len(leaves), [type(m).__name__ for m in leaves if m not in direct]
    batch = model.prepare([noise_image(40, 30, 1)], ["what is here ?"])
    with torch.no_grad():
        logits = model(batch)
        assert tl_calls == []
        _, cache = model.run_with_cache(batch)
        with _every_call_on_tls_path():
            tl_logits = model(batch)
            assert len(tl_calls) >= sum(isinstance(m, LinearBridge) for m in leaves)
            _, tl_cache = model.run_with_cache(batch)
    assert torch.equal(logits, tl_logits)
    assert sorted(cache.keys()) == sorted(tl_cache.keys())
    for name in cache.keys():
        assert torch.equal(cache[name], tl_cache[name]), name


def test_a_direct_linear_skips_tls_call_only_while_nothing_watches(tiny_model, monkeypatch):
    """Unwatched, a linear bridge is ``F.linear`` (TL's forward never runs) and records that its
    hook_out fired and consumes a pending hook_in suppression, as TL's does; a hook on either
    hook point, on the wrapped linear or on the bridge itself, a wrapped module that is not a
    plain ``nn.Linear`` or an offloaded one each send the call down TL's path, with TL's
    result (a suppressed hook_in hook stays silent there)."""
    from accelerate import cpu_offload
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

    model = tiny_model("llava")
    q = model.bridge.blocks[0].attn.q
    assert type(q) is compat.DirectLinearBridge
    x = torch.randn(2, 3, model.cfg.d_model)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, q.original_component.weight,
                                               q.original_component.bias)
        tl_calls = []
        real = LinearBridge.forward
        monkeypatch.setattr(LinearBridge, "forward",
                            lambda self, *a, **k: tl_calls.append(1) or real(self, *a, **k))
        object.__setattr__(q, "_fired_hook_out", False)
        assert torch.equal(q(x), reference) and tl_calls == [] and q._fired_hook_out

        def doubled(t, hook):
            return t * 2

        for point in (q.hook_in, q.hook_out):
            point.add_hook(doubled)
            try:
                assert torch.equal(q(x), reference * 2)
            finally:
                point.remove_hooks()
        assert len(tl_calls) == 2
        for module in (q, q.original_component):
            handle = module.register_forward_hook(lambda mod, args, out: out * 3)
            try:
                assert torch.equal(q(x), reference * 3)
            finally:
                handle.remove()
        assert len(tl_calls) == 4
        object.__setattr__(q, "_suppress_next_hook_in", True)  # TL's MLPBridge fired hook_in
        assert torch.equal(q(x), reference) and not q._suppress_next_hook_in
        assert len(tl_calls) == 4
        q.hook_in.add_hook(doubled)
        try:
            object.__setattr__(q, "_suppress_next_hook_in", True)
            assert torch.equal(q(x), reference) and not q._suppress_next_hook_in
            assert torch.equal(q(x), reference * 2)
        finally:
            q.hook_in.remove_hooks()
        assert len(tl_calls) == 6

        class Scaled(torch.nn.Linear):
            def forward(self, input):
                return super().forward(input) * 5

        other = copy.deepcopy(q)
        assert type(other) is compat.DirectLinearBridge
        scaled = Scaled(*reversed(q.original_component.weight.shape),
                        bias=q.original_component.bias is not None)
        scaled.load_state_dict(q.original_component.state_dict())
        other.set_original_component(scaled)
        assert torch.equal(other(x), reference * 5) and len(tl_calls) == 7
        plain = copy.deepcopy(q.original_component)
        other.set_original_component(cpu_offload(torch.nn.Sequential(plain))[0])
        assert other.original_component.weight.device.type == "meta"
        assert torch.equal(other(x), reference) and len(tl_calls) == 8


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3", "idefics3"])
def test_direct_norms_call_the_hf_norm_once_with_tls_output(tiny_model, family):
    """Every native-path norm of the bridge is switched; with no hook inside a norm it computes
    the norm once (TL's own forward computes it by hand for hook_scale / hook_normalized, then
    again through the HF module: two rsqrt) and the output is TL's, bit for bit, hook_in /
    hook_out firing; a hook on hook_scale gets TL's forward and its values."""
    from torch.overrides import TorchFunctionMode
    from transformer_lens.model_bridge.generalized_components.normalization import (
        NormalizationBridge,
    )

    class CountRsqrt(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.rsqrt
            return func(*args, **(kwargs or {}))

    model = tiny_model(family)
    norms = [m for m in model.bridge.modules() if isinstance(m, NormalizationBridge)]
    switched = [m for m in norms if isinstance(m, compat._DirectNorm)]
    assert switched and len(switched) == sum(compat._native_norm(m) for m in norms)
    norm = model.bridge.blocks[0].ln1
    assert norm in switched
    x = torch.randn(2, 5, model.cfg.d_model)
    with torch.no_grad():
        with CountRsqrt() as direct_ops:
            direct = norm(x)
        assert direct_ops.n == 1
        with CountRsqrt() as tl_ops:
            reference = NormalizationBridge.forward(norm, x)
        assert tl_ops.n == 2 and torch.equal(direct, reference)
    seen = []
    norm.hook_out.add_hook(lambda t, hook: seen.append(t.clone()))
    try:
        with torch.no_grad():
            with CountRsqrt() as hooked_out_ops:
                assert torch.equal(norm(x), reference)
            assert hooked_out_ops.n == 1 and torch.equal(seen[-1], reference)
            scales = []
            norm.hook_scale.add_hook(lambda t, hook: scales.append(t))
            with CountRsqrt() as hooked_ops:
                assert torch.equal(norm(x), reference)
            assert len(scales) == 1 and hooked_ops.n == 2
    finally:
        norm.hook_out.remove_hooks()
        norm.hook_scale.remove_hooks()


def test_a_direct_embedding_reads_no_signature_and_gives_tls_output(tiny_model, monkeypatch):
    """Unwatched, the embedding bridge calls its HF embedding without ``inspect.signature``;
    its output is TL's forward's; a hook on hook_out sees it (TL's path)."""
    import inspect

    from transformer_lens.model_bridge.generalized_components.embedding import EmbeddingBridge

    model = tiny_model("gemma3")  # a scaled embedding: HF's forward, not a table lookup
    embed = model.bridge.embed
    assert type(embed) is compat.DirectEmbeddingBridge
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        reference = EmbeddingBridge.forward(embed, ids)
        assert not torch.equal(reference, embed.original_component.weight[ids])  # scaled
        embed(ids)
        monkeypatch.setattr(inspect, "signature", lambda *a, **k: pytest.fail("signature read"))
        assert torch.equal(embed(ids), reference)
        monkeypatch.undo()
        seen = []
        embed.hook_out.add_hook(lambda t, hook: seen.append(t))
        try:
            assert torch.equal(embed(ids), reference) and torch.equal(seen[0], reference)
        finally:
            embed.hook_out.remove_hooks()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_token_ids_take_the_backend_path_and_equal_the_tokenizer_call(name, tiny_model):
    """``compat.token_ids`` (one text at a time on the Rust backend) gives ``tokenizer(texts)``'s
    ids, also after a padded, truncating call left those settings on the backend, and with
    special tokens split; on the tested transformers it takes that path for every family (a
    release that moves the internals it checks falls back to the tokenizer's call: this test
    says so instead of a silent slowdown)."""
    tok = copy.deepcopy(tiny_model(name).tokenizer)
    assert compat._encodes_on_backend(tok), type(tok).__mro__
    image = tiny_model(name).family.image_token_string(tiny_model(name).processor)
    texts = [f"what is {image} here ?", "a b", "", " red  blue "]
    for split in (False, True):
        tok.split_special_tokens = split
        tok(["a", "a b c d e"], padding=True, truncation=True, max_length=3)
        assert tok.backend_tokenizer.padding is not None
        assert compat.token_ids(tok, texts) == [tok(t)["input_ids"] for t in texts]


def test_offload_checks_are_skipped_only_where_accelerate_never_hooked(tiny_model):
    """TransformerLens enters ``align_module_device`` around every bridge component call; once
    a model is built that name is corelens's: a shared no-op for a module without an accelerate
    hook, accelerate's own context (which materialises offloaded weights) for one with."""
    from accelerate import cpu_offload
    from accelerate.utils import align_module_device
    from transformer_lens.model_bridge.generalized_components import base

    tiny_model("llava")
    assert base.align_module_device is compat._align_module_device
    plain = torch.nn.Linear(3, 2)
    assert base.align_module_device(plain) is base.align_module_device(torch.nn.Linear(2, 2))
    offloaded = cpu_offload(torch.nn.Sequential(torch.nn.Linear(3, 2)))[0]
    assert offloaded.weight.device.type == "meta"
    with base.align_module_device(offloaded):
        assert offloaded.weight.device.type == "cpu"
    assert offloaded.weight.device.type == "meta"
    with base.align_module_device(plain, torch.device("cpu")) as entered:  # accelerate's path
        assert entered is None
    assert type(base.align_module_device(offloaded)) is type(align_module_device(offloaded))


def test_block_kwarg_filter_reads_the_signature_once_and_equals_tls(tiny_model, monkeypatch):
    """Blocks pass their kwargs on as TransformerLens's filter would, without calling
    ``inspect.signature`` at every forward; a forward without ``**kwargs`` gets TL's filter."""
    import inspect
    import types as pytypes

    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    model = tiny_model("llava")
    block = model.bridge.blocks[0]
    x = torch.randn(1, 3, model.cfg.d_model)
    kw = {"attention_mask": None, "position_ids": None, "foo": 1}
    assert block._filter_kwargs_for_forward(kw, 1) == BlockBridge._filter_kwargs_for_forward(
        block, kw, 1) == kw
    linear = pytypes.SimpleNamespace(original_component=torch.nn.Linear(3, 2))
    kw = {"input": x, "foo": 1}
    for n in (0, 1):
        assert compat._block_kwargs(linear, kw, n) == BlockBridge._filter_kwargs_for_forward(
            linear, kw, n) == ({"input": x} if n == 0 else {})
    batch = model.prepare([Image.new("RGB", (32, 32))], ["what ?"])
    with torch.no_grad():
        reference = model(batch)
        calls = []
        real = inspect.signature
        monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
        assert torch.equal(model(batch), reference)
    assert not any(isinstance(getattr(a[0], "__self__", None), type(block.original_component))
                   for a in calls)
