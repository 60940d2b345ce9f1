"""The SAE activation store (``corelens.saes.store``) and trainer (``corelens.saes.train``) on the
shipped toy model: exact activations with the image in, roles, bounded buffer, resumption."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from PIL import Image

from corelens import zoo
from corelens.errors import InputError
from corelens.saes.sae import SAE
from corelens.saes.store import META, ROLES, ActivationStore, activations
from corelens.saes.train import train_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return zoo.load("toy-llava")


@pytest.fixture(scope="module")
def examples():
    """24 examples whose prompts differ in length (the batches are left-padded)."""
    exs = zoo.examples("toy-llava", 24, seed=11)
    return [dataclasses.replace(e, question="what color " * (i % 3) + e.question)
            for i, e in enumerate(exs)]


def _key(meta: torch.Tensor) -> torch.Tensor:
    return meta[:, 0] * 10_000 + meta[:, 1]


def _drain(store, n=None):
    out = []
    for i, b in enumerate(store):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def _cat(batches):
    return torch.cat([b.acts for b in batches]), torch.cat([b.meta for b in batches])


def _reference(model, examples, batch_size):
    """(acts, meta-lite [example, position]) straight from run_with_cache, padding dropped."""
    acts, keys = [], []
    for start in range(0, len(examples), batch_size):
        batch = model.prepare_examples(examples[start:start + batch_size])
        _, cache = model.run_with_cache(batch, names_filter=[HOOK])
        for e in range(len(batch)):
            pos = batch.attention_mask[e].nonzero()[:, 0]
            acts.append(cache[HOOK][e, pos])
            keys.append(torch.stack([torch.full_like(pos, start + e), pos], 1))
    return torch.cat(acts), torch.cat(keys)


def test_store_gives_run_with_cache_activations_exactly(model, examples):
    store = ActivationStore(model, examples, HOOK, batch_size=4, buffer_tokens=700,
                            out_batch_size=128, seed=3, progress=False)
    acts, meta = _cat(_drain(store))
    ref_acts, ref_keys = _reference(model, examples, 4)
    assert any(model.prepare_examples(examples[:4]).attention_mask.eq(0).any(1))  # padded
    order = _key(meta).argsort()
    assert torch.equal(meta[order][:, :2], ref_keys)  # every real token once, padding never
    assert torch.equal(acts[order], ref_acts)  # exact
    assert not torch.equal(meta[:, :2], ref_keys)  # and it was shuffled
    ref = activations(model, examples, HOOK, batch_size=4)  # the plain reference, in order
    assert torch.equal(ref.acts, ref_acts) and torch.equal(ref.meta, meta[order])
    assert ref.ids[0] == examples[0].id and ref.ids[-1] == examples[-1].id
    # the metadata of vision tokens is the layout's
    batch = model.prepare_examples(examples[4:8])
    for row in ref.meta[ref.meta[:, 0] == 5].tolist():
        m = dict(zip(META, row))
        info = batch.layout.token_info(1, m["position"])
        if ROLES[m["role"]] == "vision":
            assert (info.image, info.row, info.col) == (m["image"], m["row"], m["col"])
            assert batch.layout.image(1, info.image).views[m["view"]].name == info.view
        else:
            assert info is None and m["image"] == m["row"] == m["col"] == -1


@pytest.mark.parametrize("role", ROLES)
def test_roles_keep_exactly_their_positions(model, examples, role):
    ref = activations(model, examples[:8], HOOK, roles=(role,), batch_size=4)
    for start in (0, 4):
        batch = model.prepare_examples(examples[start:start + 4])
        for e in range(4):
            got = ref.position[ref.example == start + e]
            vision = batch.layout.vision_positions(e)
            real = batch.attention_mask[e].nonzero()[:, 0]
            answer = batch.query_positions[e] + 1
            want = {"vision": vision, "answer": answer, "structural": torch.zeros(0).long(),
                    "text": real[~torch.isin(real, torch.cat([vision, answer]))]}[role]
            assert torch.equal(got, want.sort().values), (role, e)
    with pytest.raises(InputError, match="roles"):
        activations(model, examples[:2], HOOK, roles=("image",))


def test_the_image_is_in(model, examples):
    exs = examples[:4]
    grey = [Image.new("RGB", e.images[0].size, (127, 127, 127)) for e in exs]
    blank = [dataclasses.replace(e, images=[g]) for e, g in zip(exs, grey)]
    a = activations(model, exs, HOOK, batch_size=4)
    b = activations(model, blank, HOOK, batch_size=4)
    assert torch.equal(a.meta, b.meta)
    vision = a.role == ROLES.index("vision")
    diff = (a.acts - b.acts).norm(dim=-1)
    assert (diff[vision] > 1e-3).float().mean() > 0.9  # the vision tokens see the image
    first = a.position == 0  # <s>, before the image: causal, so unchanged
    assert torch.equal(a.acts[first], b.acts[first])


TOWER = "vision_encoder.encoder_layers.0.hook_out"  # [images, CLS + 8x8 patches, d]


def test_tower_store_gives_the_towers_rows_exactly(model, examples):
    """Tower hooks: one row per patch (and CLS) of every image, read straight off the cache."""
    ref = activations(model, examples[:8], TOWER, batch_size=4)
    got = _cat(_drain(ActivationStore(model, examples[:8], TOWER, batch_size=4,
                                      buffer_tokens=300, out_batch_size=50, progress=False)))
    order = (got[1][:, 0] * 1000 + got[1][:, 5] * 8 + got[1][:, 6]).argsort()
    assert torch.equal(got[0][order], ref.acts) and torch.equal(got[1][order], ref.meta)
    side = 8  # toy-llava: 64 px images, 8 px patches, CLIP's CLS first
    for start in (0, 4):
        batch = model.prepare_examples(examples[start:start + 4])
        _, cache = model.run_with_cache(batch, names_filter=[TOWER])
        act = cache[TOWER]
        for e in range(4):
            mine = ref.meta[ref.example == start + e]
            rows = ref.acts[ref.example == start + e]
            cls = mine[:, 2] == ROLES.index("structural")
            assert cls.sum() == 1 and torch.equal(rows[cls][0], act[e, 0])
            assert torch.equal(rows[~cls], act[e, 1:])  # row-major patches
            r, c = mine[~cls, 5], mine[~cls, 6]
            assert torch.equal(r * side + c, torch.arange(side * side))
            assert (mine[:, 1] == -1).all() and (mine[:, 3] == 0).all()
    vision_only = activations(model, examples[:4], TOWER, roles=("vision",), batch_size=4)
    assert len(vision_only) == 4 * side * side
    with pytest.raises(InputError, match="not a per-patch"):
        activations(model, examples[:2], "vision_encoder.hook_in")  # the pixels


def test_tower_store_sees_the_image_and_resumes(model, examples, tmp_path):
    exs = examples[:4]
    grey = [dataclasses.replace(e, images=[Image.new("RGB", e.images[0].size, (127,) * 3)])
            for e in exs]
    a = activations(model, exs, TOWER, roles=("vision",), batch_size=4)
    b = activations(model, grey, TOWER, roles=("vision",), batch_size=4)
    assert ((a.acts - b.acts).norm(dim=-1) > 1e-3).float().mean() > 0.9
    kw = dict(batch_size=2, buffer_tokens=140, out_batch_size=40, seed=5, progress=False)
    whole = _drain(ActivationStore(model, examples[:12], TOWER, **kw))
    partial = tmp_path / "tower.json"
    first = _drain(ActivationStore(model, examples[:12], TOWER, partial=partial, **kw), n=7)
    rest = _drain(ActivationStore(model, examples[:12], TOWER, partial=partial, **kw))
    assert len(first + rest) == len(whole)
    for x, y in zip(first + rest, whole):
        assert torch.equal(x.meta, y.meta) and torch.equal(x.acts, y.acts)


def test_non_token_hooks_are_refused(model, examples):
    with pytest.raises(InputError, match="query, key"):
        activations(model, examples[:2], "blocks.0.attn.hook_pattern")
    with pytest.raises(InputError, match="query, key"):
        ActivationStore(model, examples, "vision_encoder.encoder_layers.0.attn.hook_pattern")
    with pytest.raises(InputError, match="no hook"):
        activations(model, examples[:2], "blocks.9.hook_resid_post")


def test_buffer_is_bounded(model, examples):
    store = ActivationStore(model, examples, HOOK, batch_size=4, buffer_tokens=500,
                            out_batch_size=64, progress=False)
    out = _drain(store)
    assert 0 < store.peak_buffer <= 500
    assert max(len(b) for b in out) == 64 and sum(len(b) for b in out) == 24 * 71 + 48
    with pytest.raises(InputError, match="buffer_tokens"):
        _drain(ActivationStore(model, examples, HOOK, batch_size=8, buffer_tokens=300,
                               progress=False))


def _every_token_once(runs, n_tokens):
    keys = torch.cat([_key(b.meta) for run in runs for b in run])
    assert len(keys) == n_tokens and len(torch.unique(keys)) == n_tokens


def test_interrupted_store_resumes_without_repeat_or_skip(model, examples, tmp_path):
    kw = dict(batch_size=4, buffer_tokens=600, out_batch_size=100, seed=1, progress=False)
    n_tokens = len(activations(model, examples, HOOK, batch_size=4))
    partial = tmp_path / "store.json"
    # 1. the consumer stops mid-way, in the middle of a fill
    first = _drain(ActivationStore(model, examples, HOOK, partial=partial, **kw), n=8)
    state = json.loads(partial.read_text())["state"]
    assert state["served"] and state["fill"] and state["start"]  # in the second fill
    # 2. the resumed store crashes inside a forward
    store = ActivationStore(model, examples, HOOK, partial=partial, **kw)
    calls, forward = {"n": 0}, type(model).forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return forward(self, *a, **k)

    second = []
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="killed"):
        mp.setattr(type(model), "forward", flaky)
        for b in store:
            second.append(b)
    # 3. the consumer raises while holding a batch (it counts as consumed: handed out)
    third = []
    with pytest.raises(KeyError):
        for b in ActivationStore(model, examples, HOOK, partial=partial, **kw):
            third.append(b)
            if len(third) == 2:
                raise KeyError("consumer")
    store = ActivationStore(model, examples, HOOK, partial=partial, **kw)
    st = store.state_dict()["state"]
    done, fill = store.consumed, store.order(0)[st["start"]:st["start"] + st["fill"]]
    last = _drain(ActivationStore(model, examples, HOOK, partial=partial, **kw))
    assert all(len(r) for r in (first, second, third, last))
    _every_token_once([first, second, third, last], n_tokens)
    store = ActivationStore(model, examples, HOOK, partial=partial, **kw)
    # the batches consumed before the last run, its open fill and what it read: each once
    read = sorted(set((torch.cat([b.meta for b in last])[:, 0] // 4).tolist()))
    assert sorted(done + read) == list(range(6)) and set(fill) <= set(read)
    assert store.exhausted and not _drain(store)
    assert json.loads(partial.read_text())["state"]["epoch"] == 1
    with pytest.raises(ValueError, match="another store"):
        ActivationStore(model, examples, HOOK, partial=partial, **{**kw, "seed": 2})


def test_resume_replays_the_same_batches(model, examples, tmp_path):
    """An interrupted-then-resumed stream is the uninterrupted one, batch for batch."""
    kw = dict(batch_size=4, buffer_tokens=600, out_batch_size=100, seed=4, progress=False,
              epochs=2)
    whole = _drain(ActivationStore(model, examples, HOOK, **kw))
    partial = tmp_path / "s.json"
    a = _drain(ActivationStore(model, examples, HOOK, partial=partial, **kw), n=23)
    b = _drain(ActivationStore(model, examples, HOOK, partial=partial, **kw))
    assert len(a + b) == len(whole)
    for x, y in zip(a + b, whole):
        assert torch.equal(x.meta, y.meta) and torch.equal(x.acts, y.acts)


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def splits():
    """Training and held-out examples (different seeds: different scenes)."""
    return zoo.examples("toy-llava", 64, seed=21), zoo.examples("toy-llava", 16, seed=22)


def _train_store(model, exs, **kw):
    return ActivationStore(model, exs, HOOK, **{**dict(
        batch_size=16, buffer_tokens=4096, out_batch_size=128, epochs=None, seed=0,
        progress=False), **kw})


@pytest.mark.parametrize("arch,kw", [("standard", {"l1_coefficient": 3.0}), ("topk", {"k": 8})])
def test_a_tiny_sae_learns_the_activations(model, splits, arch, kw, tmp_path):
    train, held = splits
    t0 = time.perf_counter()
    res = train_sae(_train_store(model, train), 256, arch, steps=200, progress=False,
                    normalize_activations="expected_average_only_in", checkpoint=tmp_path,
                    checkpoint_every=100, seed=0,
                    eval_store=ActivationStore(model, held, HOOK, batch_size=16,
                                               progress=False), **kw)
    print(f"{arch}: {res.metrics} in {time.perf_counter() - t0:.1f}s, loss "
          f"{res.losses[0]:.4g} -> {res.losses[-1]:.4g}")
    assert res.steps == 200 and len(res.losses) == 200
    assert sum(res.losses[-20:]) / 20 < 0.5 * sum(res.losses[:5]) / 5
    assert res.metrics["explained_variance"] > 0.5
    # the saved SAE (SAELens's folder, scale and decoder norms folded in) on raw activations
    sae = SAE.load(tmp_path / "sae")
    ref = activations(model, held, HOOK, batch_size=16)
    with torch.no_grad():
        feats = sae.encode(ref.acts)
        recon = sae.decode(feats)
    x = ref.acts.double()
    ev = 1 - (recon.double() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs(float(ev) - res.metrics["explained_variance"]) < 1e-4
    l0 = (feats != 0).sum(-1)
    assert abs(float(l0.double().mean()) - res.metrics["l0"]) < 1e-6
    if arch == "topk":
        assert bool((l0 == 8).all())  # k exact nonzeros
    else:
        assert res.metrics["l0"] < 256 / 2


def test_training_resumes_from_its_checkpoint(model, splits, tmp_path):
    """Interrupted after its step-60 checkpoint (at step 75, the store's own JSON ahead), the
    rerun goes on from step 60 and ends with the uninterrupted run's SAE, bit for bit."""
    train, _ = splits
    kw = dict(k=8, steps=120, checkpoint_every=30, lr=1e-3, lr_warm_up_steps=20,
              lr_decay_steps=30, dead_feature_window=15, seed=5, progress=False,
              normalize_activations="expected_average_only_in")
    whole = train_sae(_train_store(model, train), 256, "topk", checkpoint=tmp_path / "a", **kw)

    def interrupt(step, logs):
        if step == 75:
            raise KeyboardInterrupt

    partial = tmp_path / "store.json"
    with pytest.raises(KeyboardInterrupt):
        train_sae(_train_store(model, train, partial=partial), 256, "topk",
                  checkpoint=tmp_path / "b", on_step=interrupt, **kw)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 60
    resumed = train_sae(_train_store(model, train, partial=partial), 256, "topk",
                        checkpoint=tmp_path / "b", **kw)
    assert resumed.steps == 120 and len(resumed.losses) == 60
    assert resumed.losses == whole.losses[60:]
    for name, p in whole.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    with pytest.raises(ValueError, match="another run"):
        train_sae(_train_store(model, train), 256, "topk", checkpoint=tmp_path / "b",
                  **{**kw, "k": 4})


def test_a_finite_store_that_runs_out_says_so(model, splits):
    store = _train_store(model, splits[0][:16], epochs=1)
    with pytest.raises(InputError, match="ran out"):
        train_sae(store, 64, "standard", steps=100, progress=False)
