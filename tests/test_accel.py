"""CoRe-guided hybrid attention and FastV against per-head-masked references."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from conftest import noise_image
from masks_reference import hybrid_reference, own_masks

from corelens import HookedMLLM
from corelens.accel import FastV, HybridAttention, cache_nbytes

TOL = 1e-5
QWEN = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


@pytest.fixture(scope="module")
def mha_model(tmp_path_factory):
    from corelens.zoo.tiny.llava import tiny_llava

    folder = tmp_path_factory.mktemp("tiny-llava-mha")
    model, proc = tiny_llava(folder, seed=2, kv_heads=4)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return HookedMLLM.from_pretrained(str(folder))


@pytest.fixture(params=["gqa", "mha"])
def model(request, tiny_model, mha_model):
    return tiny_model("llava") if request.param == "gqa" else mha_model


def _batch(model):
    return model.prepare([noise_image(80, 50, 0), noise_image(40, 70, 1)],
                         ["what is the color ?", "what color is the square at left ?"],
                         answers=["red", "blue green"])


def _random_heads(model, n, seed):
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    return random.Random(seed).sample(pool, n)


@contextlib.contextmanager
def _masked(model, allowed):
    with contextlib.ExitStack() as stack:
        for layer, m in enumerate(allowed):
            stack.enter_context(model.attention.key_mask(layer, m.to(model.device)))
        yield


def _run(model, batch, ids=None, mask=None, pos=None):
    kw = batch.model_kwargs()
    return model.hf_model(input_ids=batch.input_ids if ids is None else ids,
                          attention_mask=kw["attention_mask"] if mask is None else mask,
                          position_ids=kw["position_ids"] if pos is None else pos,
                          pixel_values=kw["pixel_values"], use_cache=False).logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_equals_masked_reference(model, seed):
    batch = _batch(model)
    valid = batch.attention_mask.bool()
    n = [1, 3, 5][seed]
    hybrid = HybridAttention(model, _random_heads(model, n, seed), n_sink=2, window=7)
    got, ref, plain = _hybrid_prefill(model, batch, hybrid, lambda b: _run(model, b))
    assert (got - ref)[valid].abs().max() < TOL
    assert (plain - ref)[valid].abs().max() > 1e-3  # the restriction did something


def test_attach_without_batch_plans_each_call(model):
    batch = _batch(model)
    hybrid = HybridAttention(model, _random_heads(model, 2, 5), n_sink=1, window=5)
    with torch.no_grad():
        with hybrid.attach():
            got = model(batch)
        with hybrid.attach(batch):
            ref = model(batch)
    assert torch.equal(got, ref)


def test_every_head_core_is_full_attention(model):
    batch = _batch(model)
    valid = batch.attention_mask.bool()
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    hybrid = HybridAttention(model, every, window=3)
    with torch.no_grad():
        with hybrid.attach(batch):
            got = _run(model, batch)
        ref = _run(model, batch)
    assert (got - ref)[valid].abs().max() < TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_decoding_equals_masked_reference(model, seed):
    batch = _batch(model)
    n = 5
    # window 20 reaches back into the image: the cache's window-only entries matter
    hybrid = HybridAttention(model, _random_heads(model, 2 + seed, 10 + seed), n_sink=2,
                             window=[6, 20][seed])
    toks, logits = hybrid.generate(batch, max_new_tokens=n, return_logits=True)
    kw = batch.model_kwargs()
    t = batch.seq_len
    ids = torch.cat([batch.input_ids, toks[:, :-1]], 1)
    mask = torch.cat([kw["attention_mask"], torch.ones(len(batch), n - 1, dtype=torch.long)], 1)
    pos = torch.cat([kw["position_ids"], kw["position_ids"][:, -1:] + torch.arange(1, n)], 1)
    with torch.no_grad(), _masked(model, _reference(model, batch, hybrid, t + n - 1)):
        ref = _run(model, batch, ids, mask, pos)
    assert (logits - ref[:, t - 1:]).abs().max() < TOL
    assert torch.equal(toks, ref[:, t - 1:].argmax(-1))


def test_every_head_core_decoding_is_full_attention(model):
    batch = _batch(model)
    n = 3
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    toks, logits = HybridAttention(model, every).generate(batch, n, return_logits=True)
    kw = batch.model_kwargs()
    t = batch.seq_len
    ids = torch.cat([batch.input_ids, toks[:, :-1]], 1)
    mask = torch.cat([kw["attention_mask"], torch.ones(len(batch), n - 1, dtype=torch.long)], 1)
    pos = torch.cat([kw["position_ids"], kw["position_ids"][:, -1:] + torch.arange(1, n)], 1)
    with torch.no_grad():
        ref = _run(model, batch, ids, mask, pos)
    assert (logits - ref[:, t - 1:]).abs().max() < TOL


def test_kv_cache_keeps_vision_only_for_full_kv_heads(tiny_model):
    model = tiny_model("llava")  # 2 layers, 4 query heads, 2 KV heads
    batch = model.prepare([noise_image(80, 50, 0)], ["what is the color ?"])
    hybrid = HybridAttention(model, [(0, 1)], n_sink=2, window=12)
    assert hybrid.full_kv_heads == [(0, 0)] and hybrid.full_heads == [(0, 1)]
    _, cache, _ = hybrid.prefill(batch)
    t = batch.seq_len
    n_vision = int(batch.layout.vision_mask().sum())
    d = model.cfg.d_head
    vision = batch.layout.vision_mask()[0]
    # text (the sinks are text here) + the vision tokens among the last 12 prompt tokens
    kept = t - n_vision + int(vision[-12:].sum())
    assert vision[-12:].any()
    assert cache.ks[0].shape[1:] == (1, kept, d) and cache.kf[0].shape[1:] == (1, t, d)
    assert cache.kf[1].shape[1] == 0 and cache.ks[1].shape[1:] == (2, kept, d)
    full_bytes = 2 * model.cfg.n_layers * 2 * t * d * 4
    assert cache.nbytes() == 2 * (t + kept + 2 * kept) * d * 4
    assert cache.nbytes() < 0.6 * full_bytes


def test_pooled_summaries_cache_equals_prefill(tiny_model):
    """With pooled summaries, cached decoding equals running the longer prompt in prefill."""
    model = tiny_model("llava")
    batch = _batch(model)
    n = 4
    hybrid = HybridAttention(model, [(1, 2)], n_sink=2, window=5, n_pooled=3)
    toks, logits = hybrid.generate(batch, max_new_tokens=n, return_logits=True)
    kw = batch.model_kwargs()
    t = batch.seq_len
    ids = torch.cat([batch.input_ids, toks[:, :-1]], 1)
    mask = torch.cat([kw["attention_mask"], torch.ones(len(batch), n - 1, dtype=torch.long)], 1)
    pos = torch.cat([kw["position_ids"], kw["position_ids"][:, -1:] + torch.arange(1, n)], 1)
    vision = torch.cat([batch.layout.vision_mask(), torch.zeros(len(batch), n - 1,
                                                                dtype=torch.bool)], 1)
    from corelens.accel.plan import plan_streaming as _plan

    with torch.no_grad(), model.attention.kernel(hybrid._kernel):
        hybrid._plan = _plan(vision, mask.bool(), 2, 3)
        try:
            ref = _run(model, batch, ids, mask, pos)
        finally:
            hybrid._plan = None
    assert (logits - ref[:, t - 1:]).abs().max() < TOL
    with torch.no_grad(), _masked(model, _per_query_head_reference(model, batch, [(1, 2)],
                                                                   n_sink=2, window=5)):
        no_pool = _run(model, batch)
    assert (ref[:, :t] - no_pool)[batch.attention_mask.bool()].abs().max() > 1e-4


def test_random_baseline_has_the_same_kv_budget(model):
    core = HybridAttention(model, _random_heads(model, 3, 0))
    rand = HybridAttention.random(model, len(core.full_kv_heads), seed=3)
    assert len(rand.full_kv_heads) == len(core.full_kv_heads)
    assert rand.kv_budget == core.kv_budget


def test_errors():
    from corelens.errors import InputError

    class Fake:
        class family:
            name = "mystery"

    with pytest.raises(InputError, match="mystery"):
        HybridAttention(Fake(), [(0, 0)])


def test_fastv_drops_lowest_attention_and_equals_masked_reference(model):
    batch = _batch(model)
    k = 1
    fastv = FastV(model, k=k, ratio=0.5)
    vision = batch.layout.vision_mask()
    rows = batch.last_prompt_positions[:, None]
    seen = {}

    def tap(inputs):
        seen["att"] = inputs.pattern_rows(rows)[:, :, 0].mean(1)

    with torch.no_grad():
        with model.attention.tap(k - 1, tap):
            _run(model, batch)
        with fastv.attach(batch):
            got = _run(model, batch)
    dropped = fastv.dropped
    n_vision = int(vision[0].sum())
    assert dropped.shape == (len(batch), n_vision // 2)
    for e in range(len(batch)):
        att = seen["att"][e]
        kept_vision = vision[e].clone()
        kept_vision[dropped[e]] = False
        assert vision[e, dropped[e]].all()
        assert att[dropped[e]].max() <= att[kept_vision].min()
    with torch.no_grad(), _without_dropped(model, fastv, batch.seq_len):
        ref = _run(model, batch)
    assert (got - ref)[_kept_rows(batch, fastv)].abs().max() < TOL


@pytest.mark.parametrize("name", QWEN + ["idefics3", "internvl", "llava_next",
                                         "llava_onevision", "smolvlm"])
def test_fastv_kept_rows_equal_masked_reference(tiny_model, name):
    """FastV prefill on the other families (docs/accel.md's table): kept rows = full attention
    with the dropped keys masked out of layers k.. (Qwen-VL: kept tokens keep their own M-RoPE
    ids), on a left-padded batch of two prompts."""
    model = tiny_model(name)
    batch = _two(model, same_size=True)
    assert not batch.attention_mask.bool().all()
    fastv = FastV(model, k=1, ratio=0.5)
    got, ref, plain, kept = _fastv_prefill(model, batch, fastv)
    vision = batch.layout.vision_mask()
    assert fastv.dropped.shape == (len(batch), int(vision[0].sum()) // 2)
    assert vision.gather(1, fastv.dropped).all()
    assert (got - ref)[kept].abs().max() < TOL
    assert (plain - ref)[kept].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llava"] + QWEN)
def test_fastv_decoding_equals_masked_reference(tiny_model, name):
    """Cached FastV decoding on a left-padded batch = the longer sequence with the dropped
    keys (and the padding) masked out of layers k.."""
    model = tiny_model(name)
    batch = _two(model, same_size=True)
    assert not batch.attention_mask.bool().all()
    n = 4
    fastv = FastV(model, k=1, ratio=0.5)
    toks, logits = fastv.generate(batch, max_new_tokens=n, return_logits=True)
    ids, kw = _extended(model, batch, toks)
    t = batch.seq_len
    with torch.no_grad(), _without_dropped(model, fastv, t + n - 1):
        ref = model.hf_model(input_ids=ids, **kw, use_cache=False).logits
    assert (logits - ref[:, t - 1:]).abs().max() < TOL


def test_fastv_generate_caches_only_kept_tokens(model):
    batch = model.prepare([noise_image(80, 50, 0)], ["what is the color ?"])
    fastv = FastV(model, k=1, ratio=0.5)
    toks = fastv.generate(batch, max_new_tokens=3)
    cache = fastv.last_cache
    t = batch.seq_len
    n_drop = int(batch.layout.vision_mask().sum()) // 2
    assert cache.k[0].shape[2] == t + 2
    assert cache.k[1].shape[2] == t - n_drop + 2
    # the first token equals the masked reference's argmax
    with fastv.attach(batch), torch.no_grad():
        logits = _run(model, batch)
    assert toks[0, 0] == logits[0, -1].argmax()
    assert cache_nbytes(cache) < 2 * model.cfg.n_layers * t * model.cfg.d_head * 16


FAMILY_PREFILL = ["idefics3", "internvl", "llava_next", "llava_onevision", "qwen2_5_vl",
                  "qwen2_vl", "qwen3_vl", "smolvlm"]


@pytest.mark.parametrize("name", FAMILY_PREFILL)
def test_prefill_other_families(tiny_model, name):
    model = tiny_model(name)
    batch = model.prepare([noise_image(80, 50, 0), noise_image(40, 70, 1)],
                          ["what is the color ?", "what color is the square at left ?"])
    valid = batch.attention_mask.bool()
    hybrid = HybridAttention(model, _random_heads(model, 2, 0), n_sink=2, window=5)
    got, ref, plain = _hybrid_prefill(model, batch, hybrid)
    assert (got - ref)[valid].abs().max() < TOL
    assert (plain - ref)[valid].abs().max() > 1e-3  # the restriction did something


def _reference(model, batch, hybrid, seq_len=None):
    """The per-head key mask the hybrid must equal, built from first principles
    (tests/masks_reference.py: sinks + window + text within the model's own mask), not from
    ``HybridAttention.allowed`` / ``_plan``, which the kernel itself uses."""
    return _per_query_head_reference(model, batch, hybrid.heads, hybrid.n_sink, hybrid.window,
                                      seq_len)


def _per_query_head_reference(model, batch, heads, n_sink, window, seq_len=None):
    """Per layer, bool [batch, head, seq, seq]: the model's own mask for each CoRe query head
    in ``heads`` and nowhere else; every other query head (those sharing a CoRe head's KV
    head under GQA included) sees own mask AND (sink | window | text)."""
    out = hybrid_reference(model, batch, [], n_sink, window, seq_len)  # every head streaming
    own = own_masks(model, batch, seq_len)
    for layer, head in heads:
        out[layer][:, head] = own[layer]
    return out


def _mask_case(tiny_model, name, sinks_in_image=True):
    """A left-padded batch with two images or more (LLaVA: one per example; Gemma 3: two in the
    first example, one in the second), a GQA head set with a full KV group, and ``n_sink``
    reaching two tokens into each example's image (sinks that are image tokens), or 1."""
    model = tiny_model(name)
    batch = _gemma_batch(model) if name == "gemma3" else _batch(model)
    assert not batch.attention_mask.bool().all()
    assert sum(len(ex) for ex in batch.layout.images) >= 2
    first_valid = batch.attention_mask.long().argmax(-1)
    first_image = torch.tensor([int(ex[0].vision_positions[0]) for ex in batch.layout.images])
    n_sink = int((first_image - first_valid).max()) + 2 if sinks_in_image else 1
    hybrid = HybridAttention(model, [(0, 1), (1, 2)], n_sink=n_sink, window=3)
    return model, batch, hybrid


@pytest.mark.parametrize("sinks_in_image", [True, False])
@pytest.mark.parametrize("extra", [0, 4])
@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_first_principles_mask_equals_allowed(tiny_model, name, extra, sinks_in_image):
    """The tests' reference mask (tests/masks_reference.py, built from the rules in
    docs/accel.md without ``_plan``) against ``HybridAttention.allowed`` elementwise, wherever
    the model's own mask lets a key through (``allowed`` leaves that part to the model);
    ``extra`` generated tokens extend the sequence as in cached decoding."""
    model, batch, hybrid = _mask_case(tiny_model, name, sinks_in_image)
    t = batch.seq_len + extra
    ref = _reference(model, batch, hybrid, t)
    own = own_masks(model, batch, t)
    allowed = hybrid.allowed(batch, seq_len=t)
    vision = batch.layout.vision_mask()
    rank = batch.attention_mask.long().cumsum(-1) - 1
    sink_images = ((rank >= 0) & (rank < hybrid.n_sink) & vision).any(-1)
    assert sink_images.all() if sinks_in_image else not sink_images.any()
    assert len(ref) == len(allowed) == model.cfg.n_layers
    for layer, (r, a, o) in enumerate(zip(ref, allowed, own)):
        assert r.shape == a.shape == (len(batch), model.cfg.n_heads, t, t)
        bad = (r != (a & o[:, None])).nonzero()
        assert len(bad) == 0, f"layer {layer}: (example, head, i, j) {bad[:8].tolist()}"
        stream = [h for h in range(model.cfg.n_heads) if (layer, h) not in hybrid.full_heads]
        assert stream and (r[:, stream] != o[:, None]).any()  # the restriction is live
        full = [h for h in range(model.cfg.n_heads) if (layer, h) in hybrid.full_heads]
        assert full and (r[:, full] == o[:, None]).all()


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_first_principles_masks_are_what_the_model_attends(tiny_model, name):
    """The reference's own-mask part is the model's real attention (a key gets probability > 0
    exactly where it allows: causal, padding, Gemma 3's image blocks and sliding window), and
    under the reference key mask every head attends exactly where the reference says."""
    model, batch, hybrid = _mask_case(tiny_model, name)
    t = batch.seq_len
    rows = torch.arange(t)[None].expand(len(batch), t)
    valid = batch.attention_mask.bool()
    ref = _reference(model, batch, hybrid)
    own = own_masks(model, batch)
    for masks, ctx in ((own, contextlib.nullcontext()), (ref, _masked(model, ref))):
        seen = {}
        with torch.no_grad(), ctx, contextlib.ExitStack() as stack:
            for layer in range(model.cfg.n_layers):
                stack.enter_context(model.attention.tap(
                    layer, lambda inputs: seen.__setitem__(inputs.layer,
                                                           inputs.pattern_rows(rows) > 0)))
            model(batch)
        for layer, m in enumerate(masks):
            m = m if m.ndim == 4 else m[:, None].expand(-1, model.cfg.n_heads, -1, -1)
            got = seen[layer].permute(0, 2, 1, 3)[valid]  # [valid rows, head, key]
            assert torch.equal(got, m.permute(0, 2, 1, 3)[valid]), layer


def _hybrid_prefill(model, batch, hybrid, forward=None):
    """The hybrid's logits, the per-head-masked reference's and the plain model's."""
    forward = forward or model
    with torch.no_grad():
        with hybrid.attach(batch):
            got = forward(batch)
        with _masked(model, _reference(model, batch, hybrid)):
            ref = forward(batch)
        plain = forward(batch)
    return got, ref, plain


def _decode_reference(model, batch, hybrid, toks, masked=True):
    """Full-sequence logits at the generated steps (prompt + ``toks[:, :-1]``), under the
    hybrid's per-head key mask (or plain attention)."""
    ids, kw = _extended(model, batch, toks)
    t, n = batch.seq_len, toks.shape[1]
    mask = (_masked(model, _reference(model, batch, hybrid, t + n - 1)) if masked
            else contextlib.nullcontext())
    with torch.no_grad(), mask:
        return model.hf_model(input_ids=ids, **kw, use_cache=False).logits[:, t - 1:]


def _extended(model, batch, toks):
    """input ids and HF keyword arguments of the prompt followed by the generated tokens
    ``toks[:, :-1]``: the full-sequence reference for cached decoding. Position ids are left to
    HF (M-RoPE: its own ``get_rope_index`` over the longer sequence, independent of the
    decode-position logic under test), or extended by one per step."""
    n = toks.shape[1] - 1
    ids = torch.cat([batch.input_ids, toks[:, :-1]], 1)
    kw = dict(batch.model_kwargs())
    ones = torch.ones(len(batch), n, dtype=kw["attention_mask"].dtype)
    kw["attention_mask"] = torch.cat([kw["attention_mask"], ones], 1)
    pos = kw.pop("position_ids", None)
    if pos is not None and pos.ndim == 2:
        kw["position_ids"] = torch.cat([pos, pos[:, -1:] + torch.arange(1, n + 1)], 1)
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in kw:
            kw[name] = torch.cat([kw[name], torch.zeros_like(ones, dtype=kw[name].dtype)], 1)
    return ids, kw


@contextlib.contextmanager
def _without_dropped(model, fastv, seq_len):
    """FastV's reference: full attention with the dropped vision keys masked out of layers
    ``k..`` (sequences of ``seq_len``)."""
    allowed = torch.ones(len(fastv.dropped), 1, 1, seq_len, dtype=torch.bool)
    allowed.scatter_(3, fastv.dropped[:, None, None, :], False)
    with contextlib.ExitStack() as stack:
        for layer in range(fastv.k, model.cfg.n_layers):
            stack.enter_context(model.attention.key_mask(layer, allowed))
        yield


def _kept_rows(batch, fastv):
    """The real positions FastV keeps: the rows comparable with the reference."""
    kept = batch.attention_mask.bool().clone()
    kept.scatter_(1, fastv.dropped, False)
    return kept


def _fastv_prefill(model, batch, fastv):
    """FastV's logits, the reference's, the plain model's, and the kept rows."""
    with torch.no_grad():
        with fastv.attach(batch):
            got = model(batch)
        with _without_dropped(model, fastv, batch.seq_len):
            ref = model(batch)
        plain = model(batch)
    return got, ref, plain, _kept_rows(batch, fastv)


def _two(model, same_size=False):
    """A left-padded batch of two prompts; two image sizes unless ``same_size``."""
    return model.prepare([noise_image(80, 50, 0), noise_image(80 if same_size else 40,
                                                              50 if same_size else 70, 1)],
                         ["what is the color ?", "what color is the square at the left ?"])


@pytest.mark.parametrize("name", ["idefics3", "internvl", "llava_next", "llava_onevision",
                                  "smolvlm"] + QWEN)
def test_decode_other_families(tiny_model, name):
    model = tiny_model(name)
    batch = _two(model) if name in QWEN else model.prepare([noise_image(80, 50, 0)],
                                                           ["what is the color ?"])
    n = 4
    hybrid = HybridAttention(model, _random_heads(model, 2, 1), n_sink=2, window=5)
    toks, logits = hybrid.generate(batch, max_new_tokens=n, return_logits=True)
    ref = _decode_reference(model, batch, hybrid, toks)
    assert (logits - ref).abs().max() < TOL
    plain = _decode_reference(model, batch, hybrid, toks, masked=False)
    assert (plain - ref).abs().max() > 1e-3  # the restriction did something


@pytest.mark.parametrize("name", QWEN)
def test_mrope_decode_positions(tiny_model, name):
    """Text after the image continues from the prompt's largest M-RoPE id + 1, per example."""
    from corelens.accel.decoding import next_positions as _next_positions

    model = tiny_model(name)
    batch = _two(model)
    _, kw = model._inputs(batch)
    nxt, mrope = _next_positions(kw)
    toks = torch.zeros(len(batch), 3, dtype=torch.long)
    ids, ext = _extended(model, batch, toks)
    types = ext["mm_token_type_ids"]
    pos, _ = model.hf_model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                 image_grid_thw=ext["image_grid_thw"],
                                                 attention_mask=ext["attention_mask"])
    t = batch.seq_len
    assert mrope and torch.equal(pos[:, :, t:], (nxt[:, None] + torch.arange(2))[None].expand(
        3, -1, -1))
    assert not torch.equal(nxt, batch.attention_mask.sum(-1))  # not the 1-D answer


@pytest.mark.parametrize("name", QWEN + ["llava"])
def test_every_head_core_decoding_equals_hf_generate(tiny_model, name):
    model = tiny_model(name)
    batch = _two(model)
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    n = 5
    toks = HybridAttention(model, every).generate(batch, max_new_tokens=n)
    ids, kw = model._inputs(batch)
    kw.pop("position_ids")
    with torch.no_grad():
        ref = model.hf_model.generate(input_ids=ids, **kw, max_new_tokens=n, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert ref.shape[1] >= 2  # HF stops at EOS: compare what it produced
    assert torch.equal(toks[:, :ref.shape[1]], ref)


def test_kernel_hook_falls_through_and_skips_eager_layers(tiny_model):
    model = tiny_model("llava")
    batch = _batch(model)
    calls = []

    def kernel(call):
        calls.append(call.layer)
        return None  # leave it to the default path

    with torch.no_grad():
        plain = model(batch)
        with model.attention.kernel(kernel):
            got = model(batch)
            model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                    lambda p, hook: p)])
    assert torch.equal(plain, got)
    assert calls == [0, 1, 1]  # the hooked layer went eager, without the kernel
    with pytest.raises(RuntimeError), model.attention.kernel(kernel), \
            model.attention.kernel(kernel):
        pass


def test_main_accelerate_on_a_shipped_toy_model(tmp_path):
    """``corelens accelerate``'s report, every number recomputed independently: the same 24
    examples (zoo:24:3), RAM scored on the next seed's 32, each hybrid as the first-principles
    per-head key mask (tests/masks_reference.py), FastV as its definition (attention of the
    last prompt row in layer k - 1, the dropped keys masked out of layers k..), each scored
    with ``score_logits`` in batches of 16. toy-llava-deep retrieves in layer 4, so FastV at
    90% after layer 2 changes its answers (on toy-llava, retrieving in layer 0, no FastV
    setting would: the check could not fail)."""
    import json
    import types

    from corelens import zoo
    from corelens.cli.accelerate import main_accelerate
    from corelens.core.evaluate import score_logits
    from corelens.scores.ram import score_heads

    name = "toy-llava-deep"
    if name not in zoo.names():
        pytest.skip(f"{name} is not shipped in this checkout")
    out = tmp_path / "accel.json"
    args = types.SimpleNamespace(model=name, scores="ram", data="zoo:24:3", window=8,
                                 n_sink=2, frac=0.1, fastv_k=2, fastv_ratio=0.9, out=str(out))
    report = main_accelerate(args)
    assert json.loads(out.read_text()) == report
    assert set(report["variants"]) == {"full", "core_hybrid", "random_hybrid", "fastv"}
    assert report["kv_budget"] == 4 / 32 and len(report["random_kv_heads"]) == 4

    model = zoo.load(name)
    examples = zoo.examples(name, 24, seed=3)
    scoring = zoo.examples(name, 32, seed=4)
    assert report["evaluation"]["ids"] == [e.id for e in examples]
    assert report["scoring"]["ids"] == [e.id for e in scoring]
    core = score_heads(model, scoring, "ram", progress=False).top(frac=0.1)
    assert report["core_heads"] == [f"L{l}H{h}" for l, h in sorted(core)]
    rep = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    rand = [tuple(int(x) for x in kv[1:].split("KV")) for kv in report["random_kv_heads"]]
    rand = [(l, g * rep + r) for l, g in rand for r in range(rep)]  # whole groups

    def hybrid_ref(heads):
        return lambda batch: _masked(model, _per_query_head_reference(model, batch, heads,
                                                                      n_sink=2, window=8))

    def fastv_ref(batch, k=2, ratio=0.9):
        vision = batch.layout.vision_mask()
        seen = {}

        def tap(inputs):
            rows = batch.last_prompt_positions[:, None]
            seen["att"] = inputs.pattern_rows(rows)[:, :, 0].mean(1)  # [batch, key]

        with model.attention.tap(k - 1, tap):
            model(batch)
        n_drop = int(int(vision[0].sum()) * ratio)
        dropped = seen["att"].masked_fill(~vision, float("inf")).argsort(-1)[:, :n_drop]
        assert vision.gather(1, dropped).all()
        return _without_dropped(model, types.SimpleNamespace(dropped=dropped, k=k),
                                batch.seq_len)

    refs = {"full": lambda batch: contextlib.nullcontext(), "core_hybrid": hybrid_ref(core),
            "random_hybrid": hybrid_ref(rand), "fastv": fastv_ref}
    for variant, ctx in refs.items():
        correct, logprobs = [], []
        for i in range(0, len(examples), 16):
            batch = model.prepare_examples(examples[i:i + 16])
            with torch.no_grad(), ctx(batch):
                lp, ok, _ = score_logits(model(batch), batch)
            correct += ok.tolist()
            logprobs += lp.tolist()
        got = report["variants"][variant]
        # (float32 means: 1e-6 is far below one example's 1/24)
        assert abs(got["accuracy"] - sum(correct) / len(correct)) < 1e-6, variant
        assert abs(got["mean_logprob"] - sum(logprobs) / len(logprobs)) < 1e-4, variant
        assert got["accuracy_vs_full"] == got["accuracy"] / report["variants"]["full"]["accuracy"]
    acc = {variant: v["accuracy"] for variant, v in report["variants"].items()}
    lp = {variant: v["mean_logprob"] for variant, v in report["variants"].items()}
    # the trained toy reads the image; every restriction is live (random streaming heads lose
    # the answer, FastV at 90% loses log-prob), and the CoRe heads keep most of it
    assert acc["full"] >= 0.9 and acc["random_hybrid"] < acc["full"] - 0.3, acc
    assert acc["core_hybrid"] > acc["random_hybrid"] + 0.3, acc
    assert lp["fastv"] < lp["full"] - 0.1, lp


def test_fastv_qwen3_deepstack_after_the_pruning_layer(tmp_path):
    """DeepStack levels injected after a pruned layer go to the kept vision tokens only
    (a 3-layer tiny Qwen3-VL with DeepStack after layers 0 and 1, FastV from layer 1)."""
    from corelens.families import FAMILIES
    from corelens.zoo.tiny.qwen_vl import qwen3_vl_config, qwen3_vl_processor
    from corelens.zoo.tokenizer import build_tokenizer

    fam = FAMILIES["qwen3_vl"]
    tok = build_tokenizer(tmp_path, add_bos=False)
    cfg = qwen3_vl_config(tok)
    cfg.text_config.num_hidden_layers = 3
    cfg.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(0)
    hf = fam.hf_class(cfg)(cfg).eval()
    hf.save_pretrained(tmp_path)
    qwen3_vl_processor(tok).save_pretrained(tmp_path)
    model = HookedMLLM.from_pretrained(str(tmp_path))
    batch = _two(model, same_size=True)
    got, ref, _, kept = _fastv_prefill(model, batch, FastV(model, k=1, ratio=0.5))
    assert (got - ref)[kept].abs().max() < TOL


def _gemma_batch(model):
    """Two left-padded examples, the first with two images (two bidirectional blocks)."""
    from corelens.zoo.tiny import tiny_image_sizes

    (w0, h0), (w1, h1) = tiny_image_sizes("gemma3")[:2]
    return model.prepare([[noise_image(w0, h0, 0), noise_image(w1, h1, 1)],
                          [noise_image(w1, h1, 2)]],
                         ["compare <image> with <image> ?", "what is the color ?"],
                         answers=["red", "blue green"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gemma3_prefill_equals_masked_reference(tiny_model, seed):
    """Streaming heads see Gemma's own mask (bidirectional image blocks, sliding window on
    sliding layers) intersected with sinks + text + the band |i - j| <= window."""
    model = tiny_model("gemma3")
    batch = _gemma_batch(model)
    valid = batch.attention_mask.bool()
    hybrid = HybridAttention(model, _random_heads(model, [1, 3, 5][seed], seed), n_sink=2,
                             window=[3, 5, 9][seed])
    assert hybrid.sliding == [model.hf_model.config.text_config.sliding_window, None]
    got, ref, plain = _hybrid_prefill(model, batch, hybrid)
    assert (got - ref)[valid].abs().max() < TOL
    assert (plain - ref)[valid].abs().max() > 1e-3


def test_gemma3_streaming_heads_see_a_two_sided_band_in_image_blocks(tiny_model):
    """An image row of a streaming head sees later tokens of its own block within the window
    (bidirectional, as Gemma's own attention), not beyond it, and never the next block."""
    model = tiny_model("gemma3")
    batch = _gemma_batch(model)
    w = 3
    hybrid = HybridAttention(model, [], n_sink=1, window=w)
    seen = {}

    def tap(inputs):
        seen["p"] = inputs.pattern_rows(torch.tensor([[p0]]))[0, :, 0]  # [head, T]

    first, second = (img.vision_positions for img in batch.layout.images[0])
    p0 = int(first[0])
    reference = _reference(model, batch, hybrid)
    allowed = reference[1]
    with torch.no_grad(), _masked(model, reference), model.attention.tap(1, tap):
        model(batch)
    p = seen["p"][0]  # head 0
    assert allowed[0, 0, p0, p0 + w] and not allowed[0, 0, p0, p0 + w + 1]
    assert (p[p0 + 1:p0 + w + 1] > 0).all() and (p[p0 + w + 1:int(first[-1]) + 1] == 0).all()
    assert (p[second] == 0).all()


def test_gemma3_every_head_core_is_gemma(tiny_model):
    model = tiny_model("gemma3")
    batch = _gemma_batch(model)
    valid = batch.attention_mask.bool()
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    hybrid = HybridAttention(model, every, window=2)
    with torch.no_grad():
        with hybrid.attach(batch):
            got = model(batch)
        ref = model(batch)
    assert (got - ref)[valid].abs().max() < TOL
    n = 6  # beyond the sliding window (6) of the prompt's last tokens
    toks = hybrid.generate(batch, max_new_tokens=n)
    ids, kw = model._inputs(batch)
    kw.pop("position_ids", None)
    with torch.no_grad():
        hf = model.hf_model.generate(input_ids=ids, **kw, max_new_tokens=n, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert hf.shape[1] >= 2
    assert torch.equal(toks[:, :hf.shape[1]], hf)


@pytest.mark.parametrize("seed", [0, 1])
def test_gemma3_cached_decoding_equals_masked_reference(tiny_model, seed):
    model = tiny_model("gemma3")
    batch = _gemma_batch(model)
    n = 8  # generated tokens leave the sliding window's reach of the prompt
    hybrid = HybridAttention(model, _random_heads(model, 2 + seed, 20 + seed), n_sink=2,
                             window=[3, 10][seed])
    toks, logits = hybrid.generate(batch, max_new_tokens=n, return_logits=True)
    ref = _decode_reference(model, batch, hybrid, toks)
    assert (logits - ref).abs().max() < TOL
    plain = _decode_reference(model, batch, hybrid, toks, masked=False)
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_gemma3_hybrid_cache_frees_sliding_entries(tiny_model, seed):
    """Decoding past the sliding window: every step, a sliding layer holds at most
    ``sliding_window`` entries per head kind (full / streaming), all inside the window by
    original position, while the full-attention layer keeps every token; the logits equal the
    per-head-masked reference over the longer sequence."""
    model = tiny_model("gemma3")
    batch = _gemma_batch(model)
    sw = model.hf_model.config.text_config.sliding_window
    t, n = batch.seq_len, sw + 4
    assert t > 3 * sw
    hybrid = HybridAttention(model, _random_heads(model, 2 + seed, 30 + seed), n_sink=2,
                             window=[3, 10][seed])
    tc = model.hf_model.config.text_config
    per_entry = 2 * len(batch) * tc.num_key_value_heads * model.cfg.d_head * 4  # k + v, fp32
    logits, cache, pos = hybrid.prefill(batch)
    cache.reserve(n - 1)
    steps = [logits]
    for s_ in range(n - 1):
        logits = hybrid.decode_step(logits.argmax(-1), pos + s_, cache)
        steps.append(logits)
        i = cache.length - 1  # the step's own index
        sl = cache.slots[sw]
        assert sl.f_pos.shape[1] <= sw and sl.s_pos.shape[1] <= sw
        assert (sl.f_pos[sl.f_ok] > i - sw).all()
        assert cache.nbytes([0]) <= sw * per_entry
        assert cache.slots[None].f_pos.shape[1] == i + 1
    logits = torch.stack(steps, 1)
    ref = _decode_reference(model, batch, hybrid, logits.argmax(-1))
    assert (logits - ref).abs().max() < TOL


def test_gemma3_fastv_kept_rows_equal_masked_reference(tiny_model):
    """FastV on Gemma 3 (prefill): kept rows = Gemma's own attention (bidirectional blocks,
    sliding windows in original positions) with the dropped keys masked out of layers k.."""
    model = tiny_model("gemma3")
    batch = model.prepare([noise_image(80, 50, 0), noise_image(40, 70, 1)],
                          ["what is the color ?", "what color is the square at left ?"])
    got, ref, plain, kept = _fastv_prefill(model, batch, FastV(model, k=1, ratio=0.5))
    assert (got - ref)[kept].abs().max() < TOL
    assert (plain - ref)[kept].abs().max() > 1e-3


@pytest.fixture(scope="module")
def gemma3_deep(tiny_folder, tmp_path_factory):
    """The tiny Gemma 3 with three decoder layers, sliding / sliding / full: FastV at k=1
    prunes a sliding-window layer."""
    from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration

    src = tiny_folder("gemma3")
    cfg = AutoConfig.from_pretrained(src)
    cfg.text_config.num_hidden_layers = 3
    cfg.text_config.layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("tiny-gemma3-deep")
    hf.save_pretrained(folder)
    AutoProcessor.from_pretrained(src).save_pretrained(folder)
    return HookedMLLM.from_pretrained(str(folder))


@pytest.mark.parametrize("k", [1, 2])
def test_gemma3_fastv_decoding_equals_masked_reference(gemma3_deep, k):
    """Cached FastV decoding on Gemma 3, past the sliding window, on a left-padded batch = the
    longer sequence under Gemma's own mask (bidirectional
    blocks, sliding windows by original position) with the dropped keys masked out of layers
    k..; sliding layers hold at most ``sliding_window`` keys while decoding."""
    model = gemma3_deep
    batch = model.prepare([noise_image(80, 50, 0), noise_image(40, 70, 1)],
                          ["what is the color ?", "what color is the square at left ?"])
    assert not batch.attention_mask.bool().all()
    sw = model.hf_model.config.text_config.sliding_window
    n = sw + 3  # the last steps see none of the prompt on sliding layers
    fastv = FastV(model, k=k, ratio=0.5)
    toks, logits = fastv.generate(batch, max_new_tokens=n, return_logits=True)
    ids, kw = _extended(model, batch, toks)
    t = batch.seq_len
    with torch.no_grad(), _without_dropped(model, fastv, t + n - 1):
        ref = model.hf_model(input_ids=ids, **kw, use_cache=False).logits
    assert (logits - ref[:, t - 1:]).abs().max() < TOL
    with torch.no_grad():
        plain = model.hf_model(input_ids=ids, **kw, use_cache=False).logits
    assert (plain - ref)[:, t - 1:].abs().max() > 1e-3
    cache = fastv.last_cache
    kv, d = model.hf_model.config.text_config.num_key_value_heads, model.cfg.d_head
    per_key = 2 * len(batch) * kv * d * cache.k[0].element_size()
    for layer in (0, 1):  # sliding: the window, by position
        assert cache.k[layer].shape[2] <= sw
        assert (cache.pos[layer] > t + n - 2 - sw).all()
        assert cache.nbytes([layer]) <= sw * per_key
    n_kept = t - fastv.dropped.shape[1]
    assert cache.k[2].shape[2] == n_kept + n - 1  # full layer, pruned: every kept token


def test_reserved_cache_writes_in_place_and_equals_growing_cache(tiny_model):
    """``HybridCache.reserve``: decoding steps write into preallocated room (same storage every
    step) and give the same logits and byte count as a cache that grows by concatenation."""
    model = tiny_model("llava")
    batch = _batch(model)
    hybrid = HybridAttention(model, [(0, 1), (1, 2)], n_sink=2, window=5)
    runs = []
    for reserve in (False, True):
        logits, cache, pos = hybrid.prefill(batch)
        if reserve:
            cache.reserve(3)
        ptrs, out = set(), []
        for s in range(3):
            logits = hybrid.decode_step(logits.argmax(-1), pos + s, cache)
            out.append(logits)
            ptrs.add(cache.kf[0].data_ptr())
        runs.append((torch.stack(out), cache.nbytes(), len(ptrs), cache))
    (grow, grow_bytes, _, _), (res, res_bytes, res_ptrs, cache) = runs
    assert (grow - res).abs().max() < TOL
    assert grow_bytes == res_bytes and res_ptrs == 1
    t = batch.seq_len
    assert cache.kf[0].shape[2] == t + 3 and cache.slots[None].f_ok.shape[1] == t + 3


def test_from_scores_plans_kv_groups_to_the_budget(tiny_model):
    """GQA (4 query heads over 2 KV heads per layer): groups ranked by the max (or mean) of
    their heads' scores, exactly ceil(budget * layers * kv_heads) kept full, where the top
    heads by themselves would fill more groups."""
    from corelens.errors import InputError

    model = tiny_model("qwen2_5_vl")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n_kv = model.cfg.n_key_value_heads
    assert (L, H, n_kv) == (2, 4, 2)
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.8],    # L0: group 0 max 0.9 / mean 0.45, group 1
                           [0.7, 0.7, 0.6, 0.1]])   # max 0.8 / mean 0.4; L1: 0.7 / 0.7, 0.6 / .35
    by_max = HybridAttention.from_scores(model, scores, kv_budget=0.5)
    assert by_max.full_kv_heads == [(0, 0), (0, 1)] and by_max.kv_budget == 0.5
    by_mean = HybridAttention.from_scores(model, scores, kv_budget=0.5, reduce="mean")
    assert by_mean.full_kv_heads == [(0, 0), (1, 0)]
    heads = [(l, h) for l in range(L) for h in range(H) if scores[l, h] >= 0.7]  # top 4 heads
    assert HybridAttention(model, heads).kv_budget == 0.75  # 3 of 4 groups
    one = HybridAttention.from_scores(model, scores, kv_budget=0.01)  # at least one group
    assert one.full_kv_heads == [(0, 0)]
    with pytest.raises(InputError, match="2 layers x 4 heads"):
        HybridAttention.from_scores(model, torch.zeros(3, 4))
    with pytest.raises(InputError, match="kv_budget"):
        HybridAttention.from_scores(model, scores, kv_budget=0)


def test_from_scores_frac_keeps_the_best_query_heads_of_the_kept_groups(tiny_model):
    """With ``frac``, only the best-scoring query heads of the kept KV groups attend fully;
    a kept group left without one is not kept (the budget is an upper bound)."""
    from corelens.errors import InputError

    model = tiny_model("qwen2_5_vl")  # 2 layers x 4 query heads over 2 KV heads
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.8],
                           [0.7, 0.7, 0.6, 0.1]])
    two = HybridAttention.from_scores(model, scores, kv_budget=0.5, frac=0.25)  # 2 heads
    assert two.full_heads == [(0, 0), (0, 3)] and two.full_kv_heads == [(0, 0), (0, 1)]
    one = HybridAttention.from_scores(model, scores, kv_budget=0.5, frac=0.125)  # 1 head
    assert one.full_heads == [(0, 0)] and one.kv_budget == 0.25
    whole = HybridAttention.from_scores(model, scores, kv_budget=0.5)
    assert whole.full_heads == [(0, 0), (0, 1), (0, 2), (0, 3)]
    with pytest.raises(InputError, match="frac"):
        HybridAttention.from_scores(model, scores, frac=0)


def test_random_draws_query_heads_inside_the_kv_groups(tiny_model):
    from corelens.errors import InputError

    model = tiny_model("qwen2_5_vl")
    some = HybridAttention.random(model, 3, seed=4, n_heads=4)
    assert len(some.full_kv_heads) == 3 and len(some.full_heads) == 4
    assert {(l, h // 2) for l, h in some.full_heads} == set(some.full_kv_heads)
    whole = HybridAttention.random(model, 3, seed=4)
    assert whole.full_kv_heads == some.full_kv_heads  # the same groups
    assert whole.full_heads == [(l, 2 * g + r) for l, g in whole.full_kv_heads for r in (0, 1)]
    with pytest.raises(InputError, match="n_heads"):
        HybridAttention.random(model, 3, n_heads=2)


def test_split_of_a_gqa_layer():
    """Which KV heads each kind of query head reads (4 query heads per KV head)."""
    from corelens.accel.split import read_kv_heads, split_layer

    s = split_layer({1}, 8, 2)
    assert (s.full_q.tolist(), s.full_kv.tolist(), s.stream_kv.tolist()) == ([1], [0], [1])
    assert s.stream_q.tolist() == [0, 2, 3, 4, 5, 6, 7] and s.mixed
    assert s.row_full.tolist() == [[False, True, False, False]]
    # the streaming call runs over both groups (the full head's row is overwritten)
    assert s.stream_groups.tolist() == [0, 1] and s.stream_group_q.tolist() == list(range(8))
    whole = split_layer({0, 1, 2, 3}, 8, 2)
    assert whole.stream_groups.tolist() == [1] and whole.stream_group_q.tolist() == [4, 5, 6, 7]
    assert not whole.mixed and whole.full_q_kv.tolist() == [0]
    assert read_kv_heads([1, 5], 4) == [0, 1] and read_kv_heads([1, 2, 5], 4) == [0, 0, 1]
    assert read_kv_heads([0, 1, 4, 5], 4) == [0, 1]  # even: SDPA's enable_gqa pairs them


MIXED = {"one_mixed_group_per_layer": [(0, 1), (1, 3)],
         "every_group_mixed": [(0, 0), (0, 2), (1, 1)]}


def _mixed_case(tiny_model, name, heads):
    model = tiny_model(name)  # 4 query heads over 2 KV heads
    batch = {"gemma3": _gemma_batch, "llava": _batch}.get(name, _two)(model)
    hybrid = HybridAttention(model, MIXED[heads], n_sink=2, window=4)
    assert all(s.mixed for s in hybrid.splits if len(s.full_q))
    assert hybrid.full_heads == sorted(MIXED[heads])
    whole = HybridAttention(model, [(l, 2 * g + r) for l, g in hybrid.full_kv_heads
                                    for r in (0, 1)], n_sink=2, window=4)
    assert whole.full_kv_heads == hybrid.full_kv_heads
    return model, batch, hybrid, whole


@pytest.mark.parametrize("heads", list(MIXED))
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "internvl", "gemma3"])
def test_streaming_heads_of_a_full_kv_group_prefill(tiny_model, name, heads):
    """Under GQA a CoRe head's KV head keeps every key, but the other query heads of its
    group are streaming heads: prefill equals the per-query-head reference, and differs from
    the whole-group rule (every query head of a full group attending fully)."""
    model, batch, hybrid, whole = _mixed_case(tiny_model, name, heads)
    valid = batch.attention_mask.bool()
    got, ref, _ = _hybrid_prefill(model, batch, hybrid)
    with torch.no_grad(), _masked(model, _reference(model, batch, whole)):
        whole_ref = model(batch)
    assert (got - ref)[valid].abs().max() < TOL
    assert (whole_ref - ref)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("heads", list(MIXED))
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "internvl", "gemma3"])
def test_streaming_heads_of_a_full_kv_group_decode(tiny_model, name, heads):
    """Cached decoding with mixed groups (the streaming query heads of a full group read the
    streaming key set from the group's full cache; Gemma 3 past its sliding window) equals the
    per-query-head reference, and holds the same KV bytes as the whole-group plan."""
    model, batch, hybrid, whole = _mixed_case(tiny_model, name, heads)
    n = 9 if name == "gemma3" else 5
    toks, logits = hybrid.generate(batch, max_new_tokens=n, return_logits=True)
    assert (logits - _decode_reference(model, batch, hybrid, toks)).abs().max() < TOL
    assert (_decode_reference(model, batch, whole, toks) - logits).abs().max() > 1e-3
    whole.generate(batch, max_new_tokens=n)
    assert hybrid.last_cache.nbytes() == whole.last_cache.nbytes()
