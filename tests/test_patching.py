"""Patching: images go through every forward; sweeps, attribution and paths checked."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, noise_image

from corelens import InputError, LayoutError
from corelens.data.batch import repeat_batch
from corelens.interventions.patching import (
    answer_logprob,
    attribute_heads,
    check_aligned,
    logit_diff,
    patch_heads,
    patch_heads_by_group,
    patch_residual,
    patch_vision_tokens,
    path_patch,
    path_patch_sets,
    position_groups,
    prepare_pair,
)
from corelens.zoo.tiny import tiny_image_sizes


def _pair(model, name="llava"):
    (w, h) = tiny_image_sizes(name)[0]
    kw = dict(prompts=["what is the color ?", "what color is the square ?"],
              answers=["red", "blue green"], boxes=[(0, 0, w // 2, h // 2)] * 2,
              distractors=[(w // 2, h // 2, w, h)] * 2)
    clean = model.prepare([noise_image(w, h, 0), noise_image(w, h, 1)], **kw)
    corrupt = model.prepare([noise_image(w, h, 2), noise_image(w, h, 3)], **kw)
    return clean, corrupt


def _one_head_loop(model, source, target, metric):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    _, cache = model.run_with_cache(source, names_filter=lambda n: n.endswith("attn.hook_z"))
    out = torch.zeros(L, H)
    for l in range(L):
        for h in range(H):
            def hook(z, hook, h=h, l=l):
                z = z.clone()
                z[:, :, h] = cache[f"blocks.{l}.attn.hook_z"][:, :, h]
                return z
            with torch.no_grad():
                logits = model.run_with_hooks(target, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
            out[l, h] = metric(logits, target).mean()
    return out


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batched_head_sweep_equals_one_head_per_forward(name, tiny_model):
    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    swept = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=5)
    looped = _one_head_loop(model, clean, corrupt, answer_logprob)
    assert torch.allclose(swept, looped, atol=1e-4)
    with torch.no_grad():
        base = answer_logprob(model(corrupt), corrupt).mean()
    assert (swept - base).abs().max() > 1e-4  # patching did something


def test_logit_diff_works_in_the_batched_sweep(tiny_model):
    # the sweep stacks k copies of the batch: per-example ids must repeat with it
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    a = torch.stack([t[0] for t in clean.answer_tokens])
    metric = logit_diff(a, (a + 1) % model.cfg.d_vocab)
    swept = patch_heads(model, clean, corrupt, metric, heads_per_forward=5)
    assert torch.allclose(swept, _one_head_loop(model, clean, corrupt, metric), atol=1e-4)


def test_repeat_batch_runs_k_identical_copies(tiny_model):
    for name in FAMILY_NAMES:
        model = tiny_model(name)
        clean, _ = _pair(model, name)
        big = repeat_batch(clean, 3)
        with torch.no_grad():
            a = model(clean)
            b = model(big)
        for i in range(3):
            assert torch.allclose(b[2 * i:2 * i + 2], a, atol=1e-5), name


def test_transformer_lens_patching_works_with_a_batch(tiny_model):
    from transformer_lens import patching as tlp

    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    _, clean_cache = model.run_with_cache(clean)
    tl = tlp.get_act_patch_attn_head_out_all_pos(
        model, corrupt, clean_cache, lambda logits: answer_logprob(logits, corrupt).mean())
    ours = patch_heads(model, clean, corrupt, answer_logprob)
    assert torch.allclose(tl.cpu(), ours, atol=1e-4)


def test_misaligned_pairs_are_refused(tiny_model):
    model = tiny_model("llava")
    clean, _ = _pair(model)
    other = model.prepare([noise_image(80, 50, 0), noise_image(80, 50, 1)],
                          ["what is the color of it ?", "what color is the square ?"],
                          answers=["red", "blue green"])
    with pytest.raises(LayoutError, match="cannot patch"):
        check_aligned(clean, other)


def _toy_pairs(n=4, seed=3):
    from corelens import zoo
    from corelens.zoo.scenes import recolor_target

    task = zoo.task("toy-llava")
    clean = zoo.examples("toy-llava", n, seed=seed)
    corrupted = [recolor_target(e, next(c for c in task.colors if c != e.answer),
                                task.background) for e in clean]
    return clean, corrupted


def test_patching_refuses_pairs_that_teacher_force_different_answers():
    # the trap: a corrupted batch prepared with its own answer makes answer_logprob (scored on
    # the target) score the corrupted answer
    from corelens import zoo

    model = zoo.load("toy-llava")
    clean, corrupted = _toy_pairs()
    a, b = model.prepare_examples(clean), model.prepare_examples(corrupted)
    with pytest.raises(LayoutError, match="teacher-forces different answers.*prepare_pair"):
        patch_heads(model, a, b, answer_logprob)
    with pytest.raises(LayoutError, match="prepare_pair"):
        attribute_heads(model, a, b, answer_logprob)


def test_prepare_pair_forces_the_clean_answer_and_keeps_the_corrupted_one_as_wrong_ids():
    from corelens import zoo

    model = zoo.load("toy-llava")
    clean, corrupted = _toy_pairs()
    pair = prepare_pair(model, clean, corrupted)
    tok = model.tokenizer
    # the corrupted batch teacher-forces the clean answer, and its images are the corrupted ones
    answers = [e.answer for e in clean]
    assert [tok.decode(t).strip() for t in pair.corrupted.answer_tokens] == answers
    pixels = "pixel_values"
    assert not torch.equal(pair.clean.inputs[pixels], pair.corrupted.inputs[pixels])
    assert [tok.decode(int(i)).strip() for i in pair.answer_ids] == [e.answer for e in clean]
    assert [tok.decode(int(i)).strip() for i in pair.wrong_ids] == [e.answer for e in corrupted]
    # answer_logprob on the corrupted run = log p(clean answer), computed by hand
    with torch.no_grad():
        logits = model(pair.corrupted)
    lp = torch.log_softmax(logits.float(), -1)
    q = pair.corrupted.last_prompt_positions
    by_hand = lp[torch.arange(len(q)), q, pair.answer_ids]
    assert torch.allclose(answer_logprob(logits, pair.corrupted), by_hand, atol=1e-5)
    # ... which the recolouring makes unlikely: the trained model reads the new colour
    assert (by_hand < lp[torch.arange(len(q)), q, pair.wrong_ids]).all()
    diff = pair.logit_diff(logits, pair.corrupted)
    assert torch.allclose(diff, logits[torch.arange(len(q)), q, pair.answer_ids]
                          - logits[torch.arange(len(q)), q, pair.wrong_ids])
    assert pair.source_target("noise") == (pair.corrupted, pair.clean)


def test_prepare_pair_refuses_unchanged_answers_and_unequal_lengths():
    from dataclasses import replace

    from corelens import zoo

    model = zoo.load("toy-llava")
    clean, corrupted = _toy_pairs(2)
    with pytest.raises(LayoutError, match="same clean and corrupted answer"):
        prepare_pair(model, clean, [replace(k, answer=c.answer) for c, k in zip(clean, corrupted)])
    with pytest.raises(LayoutError, match="as many corrupted"):
        prepare_pair(model, clean, corrupted[:1])


def test_position_groups_and_group_patching(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    groups = position_groups(clean)
    labels = [g for g, _ in groups]
    assert labels[:3] == ["evidence", "distractor 0", "other vision"]
    for e in range(len(clean)):
        covered = torch.cat([p[e] for _, p in groups]).sort().values
        real = clean.attention_mask[e].bool().nonzero().flatten()
        assert torch.equal(covered, real)  # every real position exactly once
    by_group, names = patch_heads_by_group(model, clean, corrupt, answer_logprob)
    assert by_group.shape == (model.cfg.n_layers, model.cfg.n_heads, len(groups))
    resid, _ = patch_residual(model, clean, corrupt, answer_logprob)
    with torch.no_grad():
        clean_value = answer_logprob(model(clean), clean).mean()
        corrupt_value = answer_logprob(model(corrupt), corrupt).mean()
    # patching the whole vision set of the residual at layer 0 restores the clean image's info:
    vision_cols = [i for i, n in enumerate(names) if not n.startswith("text")]
    assert not torch.allclose(resid[0, vision_cols], corrupt_value)
    # text tokens are identical in the pair: patching one changes nothing
    text_cols = [i for i, n in enumerate(names) if n.startswith("text")]
    assert torch.allclose(resid[0, text_cols], corrupt_value, atol=1e-5)
    assert clean_value != corrupt_value


def test_vision_token_patching_per_token(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    per_token = patch_vision_tokens(model, clean, corrupt, answer_logprob)
    assert per_token.shape == (len(clean.layout.vision_positions(0)),)
    with torch.no_grad():
        base = answer_logprob(model(corrupt), corrupt)[0]
    assert (per_token - base).abs().max() > 0


def _linearised(model, batch):
    """Freeze the final norm's scale and the last MLP: logits become linear in last-layer z."""
    L = model.cfg.n_layers
    names = ["ln_final.hook_scale", f"blocks.{L - 1}.hook_mlp_out"]
    _, cache = model.run_with_cache(batch, names_filter=names)
    def frozen(n):  # repeated to the batch it meets (head sweeps run k copies at once)
        def hook(x, hook):
            c = cache[n]
            return c.repeat(x.shape[0] // c.shape[0], *([1] * (c.ndim - 1)))
        return hook

    return [(n, frozen(n)) for n in names]


def test_attribution_is_exact_where_the_metric_is_linear(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    L = model.cfg.n_layers
    def logit_metric(logits, batch):  # linear in the logits
        q = batch.last_prompt_positions
        return torch.stack([logits[e, q[e], batch.answer_tokens[e][0]]
                            for e in range(len(batch))])

    with model.hooks(fwd_hooks=_linearised(model, corrupt)):
        atp = attribute_heads(model, clean, corrupt, logit_metric)
        exact = patch_heads(model, clean, corrupt, logit_metric)
        with torch.no_grad():
            base = logit_metric(model(corrupt), corrupt).mean()
    assert torch.allclose(atp[L - 1], exact[L - 1] - base, atol=1e-5)
    # earlier layers: an estimate, correlated but not exact
    assert torch.corrcoef(torch.stack([atp.flatten(), (exact - base).flatten()]))[0, 1] > 0.5


def test_path_patching_to_logits_equals_head_patching_of_the_last_layer(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    L = model.cfg.n_layers
    with model.hooks(fwd_hooks=_linearised(model, corrupt)[1:]):  # last MLP frozen in both
        exact = patch_heads(model, clean, corrupt, answer_logprob)
    for h in range(model.cfg.n_heads):
        via_path = path_patch(model, clean, corrupt, answer_logprob, [(L - 1, h)], "logits",
                              freeze_mlps=True)
        assert via_path == pytest.approx(float(exact[L - 1, h]), abs=1e-4)


def _path_reference(model, source, target, metric, senders, freeze_mlps, receivers="logits"):
    """Path patching written out: every layer's z hooked (the target's, the senders' from the
    source), every MLP output frozen to the target's when asked; to the logits, or recording the
    receivers' inputs and patching only those into a second target run."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    mlps = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    _, src = model.run_with_cache(source, names_filter=names)
    _, tgt = model.run_with_cache(target, names_filter=names + mlps)

    def z_hook(z, hook):
        l = int(hook.name.split(".")[1])
        z = tgt[hook.name].clone()
        for sl, h in senders:
            if sl == l:
                z[:, :, h] = src[hook.name][:, :, h]
        return z

    hooks = [(n, z_hook) for n in names]
    if freeze_mlps:
        hooks += [(n, lambda x, hook: tgt[hook.name]) for n in mlps]
    if receivers == "logits":
        with torch.no_grad():
            return float(metric(model.run_with_hooks(target, fwd_hooks=hooks), target).mean())
    recorded = {}  # step 1: the receivers' inputs under the senders' patch
    rec_names = {f"blocks.{l}.attn.hook_{kind}" for l, _, kind in receivers}

    def record(x, hook):
        recorded[hook.name] = x.clone()

    with torch.no_grad():
        model.run_with_hooks(target, fwd_hooks=hooks + [(n, record) for n in rec_names])

    def patch(x, hook):  # step 2: only those inputs patched into the target run
        x = x.clone()
        for l, h, kind in receivers:
            if hook.name == f"blocks.{l}.attn.hook_{kind}":
                x[:, :, h] = recorded[hook.name][:, :, h]
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(target, fwd_hooks=[(n, patch) for n in rec_names])
    return float(metric(logits, target).mean())


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("freeze_mlps", [True, False])
@pytest.mark.parametrize("to", ["logits", "receivers"])
def test_path_patching_sweep_equals_the_steps_written_out(name, freeze_mlps, to, tiny_model):
    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    kv = model.cfg.n_key_value_heads or H
    receivers = "logits" if to == "logits" else (
        [(L - 1, h, "q") for h in range(0, H, 2)] + [(L - 1, 0, "k"), (1, kv - 1, "v")])
    sets = [[(l, h)] for l in range(L) for h in range(H)] + [[(0, 1), (L - 1, 0)], []]
    swept = path_patch_sets(model, clean, corrupt, answer_logprob, sets, receivers,
                            freeze_mlps=freeze_mlps, per_forward=3)
    reference = torch.tensor([_path_reference(model, clean, corrupt, answer_logprob, s,
                                              freeze_mlps, receivers) for s in sets])
    assert torch.allclose(swept, reference, atol=1e-4), (swept - reference).abs().max()
    assert (swept[:-1] - swept[-1]).abs().max() > 1e-4  # the senders change something
    with torch.no_grad():  # no sender: the target run
        assert float(swept[-1]) == pytest.approx(
            float(answer_logprob(model(corrupt), corrupt).mean()), abs=1e-4)
    assert path_patch(model, clean, corrupt, answer_logprob, sets[0], receivers,
                      freeze_mlps=freeze_mlps) == pytest.approx(float(reference[0]), abs=1e-4)


def test_path_patching_names_a_sender_outside_the_model(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    L = model.cfg.n_layers
    with pytest.raises(InputError, match=rf"\({L}, 0\)\] are outside this model"):
        path_patch_sets(model, clean, corrupt, answer_logprob, [[(0, 0)], [(L, 0)]])


def test_path_patching_through_receivers(tiny_model):
    model = tiny_model("llava")
    clean, corrupt = _pair(model)
    with torch.no_grad():
        base = float(answer_logprob(model(corrupt), corrupt).mean())
    # sender head 0 of layer 0 -> every q/k/v input of layer 1: some effect
    kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    receivers = ([(1, h, "q") for h in range(model.cfg.n_heads)]
                 + [(1, g, "k") for g in range(kv)] + [(1, g, "v") for g in range(kv)])
    full = path_patch(model, clean, corrupt, answer_logprob, [(0, 0)], receivers)
    assert abs(full - base) > 1e-5
    # a sender in the last layer reaches no later receiver: no effect through layer-1 inputs
    none = path_patch(model, clean, corrupt, answer_logprob, [(1, 0)], [(1, 0, "q")])
    assert none == pytest.approx(base, abs=1e-6)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_batched_sweep_runs_the_vision_tower_once(name, tiny_model):
    """The stacked copies reuse the target's image features: the tower runs for the source's
    cache and once for the target, not once per stacked forward — and the numbers match the
    sweep that reruns it."""
    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    vision = [n for n in model.hook_dict if n.startswith("vision") and n.endswith("hook_in")]
    assert vision, "no vision hook to count tower runs with"
    calls = []

    def count(x, hook):
        calls.append(x.shape[0])
    with model.hooks(fwd_hooks=[(vision[0], count)]):
        reused = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=3)
        n_reused = len(calls)
        calls.clear()
        rerun = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=3,
                            reuse_vision=False)
    n_chunks = -(-model.cfg.n_layers * model.cfg.n_heads // 3)
    # rerun: the source's cache, the unedited target once (the block outputs that chunks
    # editing only later layers resume from), then every chunk
    assert n_reused == 2 and len(calls) == 2 + n_chunks
    assert torch.allclose(reused, rerun, atol=1e-5)


def test_resumed_sweep_skips_the_blocks_before_the_first_edit(tiny_model):
    """One stacked forward per layer: with ``resume`` the forward patching layer l starts from
    the unedited run's output of block l - 1 (recorded once), and the numbers are those of the
    full forwards."""
    from corelens.interventions.core import first_block

    model = tiny_model("llava")
    clean, corrupt = _pair(model, "llava")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert L >= 2
    runs = {0: 0, L - 1: 0}

    def count(layer):
        def hook(x, hook):
            runs[layer] += 1
        return hook
    counters = [(f"blocks.{l}.hook_resid_pre", count(l)) for l in runs]
    with model.hooks(fwd_hooks=counters):
        resumed = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=H)
        skipped = dict(runs)
        runs.update({l: 0 for l in runs})
        full = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=H,
                           resume=False)
    # the source's cache, one unedited target run (its image features and the block outputs
    # that chunks resume from), then only the layer-0 chunk runs block 0
    assert skipped == {0: 3, L - 1: 2 + L}
    assert runs == {0: 2 + L, L - 1: 2 + L}  # the image features' run, then every chunk
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-5)
    assert first_block(["blocks.3.attn.hook_z", "blocks.1.hook_resid_post"], 4) == 1
    assert first_block(["ln_final.hook_normalized"], 4) == 4
    assert first_block(["blocks.2.attn.hook_z", "hook_embed"], 4) == 0


def _count_calls(model, part):
    """Calls of each decoder layer's ``attn.<part>`` projection (the wrapped nn.Linear)."""
    calls = {l: 0 for l in range(model.cfg.n_layers)}
    handles = [getattr(model.bridge.blocks[l].attn, part).original_component
               .register_forward_hook(lambda m, a, o, l=l: calls.__setitem__(l, calls[l] + 1))
               for l in range(model.cfg.n_layers)]
    return calls, handles


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_replayed_and_trimmed_sweep_equals_one_head_per_forward(name, tiny_model):
    """One stacked forward per layer: the layer-l forward replays layer l's attention (its
    recorded z fed to hook_z and o_proj: no q, k, v projection runs there) and the last block
    computes only the rows the metric reads (its keys and values over every row); the numbers
    are those of one full forward per head, on every family."""
    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert L >= 2
    counts = [_count_calls(model, p) for p in ("q", "k", "v")]
    rows = []
    mlp = model.bridge.blocks[L - 1].mlp.original_component.register_forward_hook(
        lambda m, a, o: rows.append(a[0].shape[1]))
    try:
        swept = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=H)
    finally:
        for _, handles in counts:
            for h in handles:
                h.remove()
        mlp.remove()
    # the source's cache and the unedited target run compute every layer; then the layer-l
    # forward skips layer l's q, k, v (replayed) and layer l' > l computes them: l' is the
    # last block, whose queries are the metric's rows only
    for calls, _ in counts:
        assert calls == {l: 2 + l for l in range(L)}
    keep = corrupt.logits_to_keep
    assert keep < corrupt.seq_len and rows == [corrupt.seq_len] * 2 + [keep] * L
    looped = _one_head_loop(model, clean, corrupt, answer_logprob)
    torch.testing.assert_close(swept, looped, rtol=0, atol=1e-4)
    plain = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=H,
                        resume=False)
    torch.testing.assert_close(swept, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3"])
def test_sweeps_that_edit_before_z_or_read_every_row_compute_in_full(name, tiny_model):
    """A job editing hook_q (or the pattern) at its first layer changes what comes before z:
    that layer is computed, not replayed; a live hook before z (here a read-only one on the
    rotated queries) also turns replay off; a metric reading every row keeps the last block
    whole. All still equal one full forward per job."""
    from corelens.interventions.core import replays_z, sweep, trims_last_block

    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    src = {n: t for n, t in model.run_with_cache(clean)[1].items()}

    def q_job(l, h):
        def edit(x):
            x[:, :, h] = src[f"blocks.{l}.attn.hook_q"][:, :, h]
        return [(f"blocks.{l}.attn.hook_q", edit)]

    def pattern_job(l, h):
        def edit(x):
            x[:, h] = x[:, h].roll(1, dims=-1)  # move each query's attention one key on
        return [(f"blocks.{l}.attn.hook_pattern", edit)]

    def z_job(l, h):
        def edit(x):
            x[:, :, h] = src[f"blocks.{l}.attn.hook_z"][:, :, h]
        return [(f"blocks.{l}.attn.hook_z", edit)]

    def every_row(logits, batch):  # not a query_metric: the forward keeps every row
        return logits.float().logsumexp(-1).mean(-1)

    def loop(jobs, metric):
        out = []
        for job in jobs:
            hooks = [(n, lambda x, hook, e=e: (x := x.clone(), e(x))[0]) for n, e in job]
            with torch.no_grad():
                out.append(metric(model.run_with_hooks(corrupt, fwd_hooks=hooks), corrupt))
        return torch.stack(out)

    for make in (q_job, pattern_job):
        jobs = [make(l, h) for l in range(L) for h in range(H)]
        assert not replays_z([n for job in jobs[:H] for n, _ in job], 0)
        calls, handles = _count_calls(model, "q")
        try:
            got = sweep(model, corrupt, answer_logprob, jobs, per_forward=H)
        finally:
            for h in handles:
                h.remove()
        assert calls[0] == 2  # the unedited run, then the layer-0 forward computes it
        torch.testing.assert_close(got, loop(jobs, answer_logprob), rtol=0, atol=1e-4)

    jobs = [z_job(l, h) for l in range(L) for h in range(H)]
    assert replays_z([n for job in jobs[:H] for n, _ in job], 0)
    assert replays_z(["blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "blocks.2.attn.hook_q",
                      "ln_final.hook_normalized"], 1)
    for before in ("hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
                   "blocks.1.attn.hook_rot_k", "vision_encoder.hook_in"):
        assert not replays_z(["blocks.1.attn.hook_z", before], 1)
    assert trims_last_block([n for job in jobs[:H] for n, _ in job], L, replayed=False)
    assert not trims_last_block(["ln_final.hook_normalized"], L, replayed=False)
    assert not trims_last_block([f"blocks.{L - 1}.hook_resid_post"], L, replayed=False)
    calls, handles = _count_calls(model, "q")
    seen = []
    try:
        replayed = sweep(model, corrupt, answer_logprob, jobs, per_forward=H)
        assert calls[0] == 1  # the unedited run only: the layer-0 forward replays layer 0
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_rot_q",
                                     lambda x, hook: seen.append(x.shape))]):
            got = sweep(model, corrupt, answer_logprob, jobs, per_forward=H)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == 1 + 2 and len(seen) == 2  # layer 0 computed: its queries are hooked
    torch.testing.assert_close(got, replayed, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, loop(jobs, answer_logprob), rtol=0, atol=1e-4)
    got = sweep(model, corrupt, every_row, jobs, per_forward=H)
    torch.testing.assert_close(got, loop(jobs, every_row), rtol=0, atol=1e-4)

    def scale(x):  # an edit before every block: the layer-0 attention must not replay
        x.mul_(1.5)
    mixed = [[("embed.hook_out", scale)] + z_job(0, h) for h in range(H)]
    got = sweep(model, corrupt, answer_logprob, mixed, per_forward=H)
    torch.testing.assert_close(got, loop(mixed, answer_logprob), rtol=0, atol=1e-4)
    plain = sweep(model, corrupt, answer_logprob, mixed[:1], per_forward=1)
    assert (got[0] - plain[0]).abs().max() < 1e-4


def _one_forward_each(model, target, metric, name, src, edits):
    """The obvious loop: one forward per edit (an in-place edit of the hooked tensor)."""
    out = []
    for edit in edits:
        def hook(x, hook, edit=edit):
            x = x.clone()
            edit(x, src)
            return x
        with torch.no_grad():
            out.append(metric(model.run_with_hooks(target, fwd_hooks=[(name(edit), hook)]),
                              target))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_group_residual_and_token_sweeps_equal_one_forward_each(name, tiny_model):
    from corelens.interventions.core import index_pairs as _index

    model = tiny_model(name)
    clean, corrupt = _pair(model, name)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    groups = position_groups(corrupt)
    _, cache = model.run_with_cache(clean)

    # residual stream by layer x group
    resid, _ = patch_residual(model, clean, corrupt, answer_logprob, per_forward=5)
    edits = []
    for l in range(L):
        for _, per in groups:
            ex, pos = _index(per)

            def edit(x, src, l=l, ex=ex, pos=pos):
                x[ex, pos] = src[f"blocks.{l}.hook_resid_pre"][ex, pos]
            edit.layer = l
            edits.append(edit)
    ref = _one_forward_each(model, corrupt, answer_logprob,
                            lambda e: f"blocks.{e.layer}.hook_resid_pre", cache, edits)
    assert torch.allclose(resid.flatten(), ref.mean(1), atol=1e-4)

    # heads by group (layer 1 only, to keep it short)
    by_group, _ = patch_heads_by_group(model, clean, corrupt, answer_logprob, per_forward=7)
    edits = []
    for h in range(H):
        for _, per in groups:
            ex, pos = _index(per)

            def edit(z, src, h=h, ex=ex, pos=pos):
                z[ex, pos, h] = src["blocks.1.attn.hook_z"][ex, pos, h]
            edits.append(edit)
    ref = _one_forward_each(model, corrupt, answer_logprob, lambda e: "blocks.1.attn.hook_z",
                            cache, edits)
    assert torch.allclose(by_group[1].flatten(), ref.mean(1), atol=1e-4)

    # vision tokens of example 1
    tokens = patch_vision_tokens(model, clean, corrupt, answer_logprob, example=1,
                                 per_forward=6)
    edits = []
    for p in corrupt.layout.vision_positions(1).tolist():
        def edit(x, src, p=p):
            x[1, p] = src["blocks.0.hook_resid_pre"][1, p]
        edits.append(edit)
    ref = _one_forward_each(model, corrupt, answer_logprob, lambda e: "blocks.0.hook_resid_pre",
                            cache, edits)
    assert torch.allclose(tokens, ref[:, 1], atol=1e-4)


def test_pairs_with_the_same_token_count_but_another_image_shape_are_refused(tiny_model):
    """80x50 and 50x80 images can give the same number of vision tokens at the same positions;
    the tokens then cover other grid cells (and other M-RoPE ids): patching between them would
    move activations between image cells, so check_aligned refuses it."""
    from corelens.errors import LayoutError
    from corelens.interventions.patching import check_aligned

    model = tiny_model("qwen2_5_vl")
    kw = dict(prompts=["what is the color ?"], answers=["red"])
    wide = model.prepare([noise_image(80, 48, 0)], **kw)
    tall = model.prepare([noise_image(48, 80, 1)], **kw)
    assert torch.equal(wide.layout.vision_positions(0), tall.layout.vision_positions(0))
    with pytest.raises(LayoutError, match="grid cells"):
        check_aligned(wide, tall)
    check_aligned(wide, model.prepare([noise_image(80, 48, 2)], **kw))  # same shape: fine
