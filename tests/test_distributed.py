"""The runner (corelens.runner): data-parallel scoring and ablation sweeps under torchrun (2 gloo
ranks on CPU) equal one process, and resume after a crash without redoing finished units;
device_map / bf16 loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import grounded_examples

from corelens import HookedMLLM
from corelens.data.loaders import load_jsonl, save_jsonl
from corelens.families import FAMILIES
from corelens.runner import FAIL_ENV, partial_files, rank_file, read_records
from corelens.scores.head_scores import HeadScores
from corelens.scores.ram import RamParams, score_all

BATCH = 2




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 grounded examples as JSONL (4 global batches of 2) and their loaded form."""
    folder = tmp_path_factory.mktemp("dist-data")
    path = save_jsonl(grounded_examples("llava", 7), folder / "data.jsonl")
    return path, load_jsonl(path)


@pytest.fixture(scope="module")
def single(tiny_model, data):
    """The single-process reference: ``score_all`` on the same loaded examples."""
    return score_all(tiny_model("llava"), data[1], batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def single_all(tiny_model, data):
    """What ``corelens score --metric all`` computes in one process: every score, Kang's
    spatial entropy included (``RamParams(kang_entropy=True)``)."""
    return score_all(tiny_model("llava"), data[1], batch_size=BATCH, progress=False,
                     params=RamParams(kang_entropy=True))


def _launch(args: list[str], env_extra: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m corelens ARGS`` (gloo on CPU)."""
    env = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "corelens", *args, "--threads", "1", "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _torchrun(folder: str, data: Path, out: Path, partial: Path,
              env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _launch(["score", "--model", folder, "--data", str(data), "--out", str(out),
                    "--metric", "all", "--batch-size", str(BATCH), "--partial", str(partial)],
                   env_extra)


def _assert_same(got: dict[str, HeadScores], ref: dict[str, HeadScores]) -> None:
    assert set(got) == set(ref)
    for k, hs in ref.items():
        torch.testing.assert_close(got[k].scores, hs.scores, rtol=0, atol=0, equal_nan=True,
                                   msg=k)
        if hs.per_example is not None:
            torch.testing.assert_close(got[k].per_example, hs.per_example, rtol=0, atol=0,
                                       equal_nan=True, msg=k)
        assert got[k].n_examples == hs.n_examples and got[k].params == hs.params


def _load_all(path: Path) -> dict[str, HeadScores]:
    return {k: HeadScores.from_dict(v) for k, v in json.loads(path.read_text()).items()}


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_single_process(tiny_folder, data, single_all,
                                                       tmp_path):
    out, partial = tmp_path / "scores.json", tmp_path / "partial.jsonl"
    run = _torchrun(tiny_folder("llava"), data[0], out, partial)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _assert_same(_load_all(out), single_all)
    # rank r ran global batches r, r + 2, ... and wrote them to its own file
    for r in (0, 1):
        lines = rank_file(partial, r).read_text().splitlines()
        assert [json.loads(line)["unit"] for line in lines] == list(range(r, 4, 2))


@pytest.mark.slow
def test_torchrun_crash_then_resume(tiny_folder, data, single_all, tmp_path):
    out, partial = tmp_path / "scores.json", tmp_path / "partial.jsonl"
    crashed = _torchrun(tiny_folder("llava"), data[0], out, partial, {FAIL_ENV: "1:1"})
    assert crashed.returncode != 0 and not out.exists()
    before = {f: f.read_text() for f in partial_files(partial)}
    done_before = read_records(list(before))
    assert 1 in done_before and 3 not in done_before  # rank 1 died after its first batch
    run = _torchrun(tiny_folder("llava"), data[0], out, partial)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _assert_same(_load_all(out), single_all)
    # finished batches were kept, not recomputed: old lines are prefixes, each batch once
    ids = []
    for f in partial_files(partial):
        text = f.read_text()
        assert text.startswith(before.get(f, "").rstrip("\n"))
        ids += [json.loads(line)["unit"] for line in text.splitlines()
                if line.strip().endswith("}")]
    assert sorted(ids) == [0, 1, 2, 3]


def test_world_of_one_equals_score_all_and_resumes(tiny_model, data, single, tmp_path):
    """Without torchrun: records go to ``partial`` itself, and a rerun reads them back instead
    of recomputing (a torn last line is ignored and its unit redone)."""
    model = tiny_model("llava")
    partial = tmp_path / "p.jsonl"
    got = score_all(model, data[1], batch_size=BATCH, partial=partial, progress=False)
    _assert_same(got, single)
    assert partial_files(partial) == [partial] and len(partial.read_text().splitlines()) == 4
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # killed mid-write
    calls = []
    orig = model.prepare_examples
    model.prepare_examples = lambda exs: calls.append(len(exs)) or orig(exs)
    try:
        again = score_all(model, data[1], batch_size=BATCH, partial=partial, progress=False)
    finally:
        del model.prepare_examples
    _assert_same(again, single)
    assert calls == [1]  # only the torn unit (batch 3: one example) was recomputed
    assert sorted(read_records([partial])) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="another run"):
        score_all(model, data[1], batch_size=3, partial=partial, progress=False)
    with pytest.raises(ValueError, match="another run"):
        score_all(model, data[1], batch_size=BATCH, params=RamParams(tau=0.3),
                  partial=partial, progress=False)


def test_ablation_sweep_resumes_to_the_same_curve(tiny_model, data, single, tmp_path):
    from corelens.interventions.ablation import ablation_curve

    model = tiny_model("llava")
    kw = dict(fracs=(0.25,), seeds=(0, 1), batch_size=BATCH, progress=False)
    ref = ablation_curve(model, data[1][:4], single["ram"], **kw)
    partial = tmp_path / "abl.jsonl"
    got = ablation_curve(model, data[1][:4], single["ram"], partial=partial, **kw)
    # 5 jobs (none, top, bottom, 2 random) x 2 batches, one record each; a rerun computes none
    assert sorted(read_records([partial])) == [(j, b) for j in range(5) for b in range(2)]
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:7]) + "\n")  # stopped after 7 of 10 units
    again = ablation_curve(model, data[1][:4], single["ram"], partial=partial, **kw)
    assert len(partial.read_text().splitlines()) == 10
    for m in ("accuracy", "logprob"):
        assert got.to_dict(m) == ref.to_dict(m) == again.to_dict(m)


@pytest.mark.slow
def test_torchrun_ablation_sweep_equals_ablation_curve(tiny_folder, tiny_model, data, single,
                                                       tmp_path):
    from corelens.interventions.ablation import AblationCurve, ablation_curve

    single["ram"].save(tmp_path / "ram.json")
    ref = ablation_curve(tiny_model("llava"), data[1], single["ram"], fracs=(0.25, 0.5),
                         seeds=(0, 1), batch_size=BATCH, progress=False)
    out = tmp_path / "curve.json"
    run = _launch(["ablate", "--model", tiny_folder("llava"), "--data", str(data[0]),
                   "--scores", str(tmp_path / "ram.json"), "--out", str(out),
                   "--fracs", "0.25,0.5", "--seeds", "2", "--batch-size", str(BATCH)])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = AblationCurve.load(out)
    for m in ("accuracy", "logprob"):
        assert got.to_dict(m) == ref.to_dict(m)
    # 9 jobs (none; top, bottom, 2 random per fraction) x 4 batches, each unit done once
    units = read_records(partial_files(str(out) + ".partial"))
    assert sorted(units) == [(j, b) for j in range(9) for b in range(4)]


# --------------------------------------------------------------------- device_map and bf16
def test_device_map_cpu_loads_and_matches(tiny_folder, tiny_model, data, single):
    model = HookedMLLM.from_pretrained(tiny_folder("llava"), device_map={"": "cpu"})
    assert model.device == torch.device("cpu")
    got = score_all(model, data[1][:4], batch_size=BATCH, progress=False)
    for k in ("ram", "visual_mass", "spatial_entropy"):
        torch.testing.assert_close(got[k].per_example, single[k].per_example[:4], rtol=0,
                                   atol=1e-6, msg=k)
    auto = HookedMLLM.from_pretrained(tiny_folder("llava"), device_map="auto")
    assert auto.device.type in ("cpu", "cuda")  # "auto" on this machine: wherever it fits
    with pytest.raises(ValueError, match="not both"):
        HookedMLLM.from_pretrained(tiny_folder("llava"), device="cpu", device_map="auto")


def test_accelerate_hooks_per_layer(tiny_folder, data, single):
    """A dispatched model (accelerate hooks on every decoder layer, as a multi-GPU device_map
    installs them) still runs every corelens hook and gives the same RAM."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_folder("llava")
    config = AutoConfig.from_pretrained(folder)
    fam = FAMILIES["llava"]
    hf = fam.hf_class(config).from_pretrained(folder, local_files_only=True)
    n = config.text_config.num_hidden_layers
    dmap = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
            "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
            "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
            **{f"model.language_model.layers.{i}": "cpu" for i in range(n)}}
    hf = dispatch_model(hf, device_map=dmap, force_hooks=True)
    calls: list[str] = []
    orig = AlignDevicesHook.pre_forward

    def counting(self, module, *args, **kwargs):
        calls.append(type(module).__name__)
        return orig(self, module, *args, **kwargs)

    AlignDevicesHook.pre_forward = counting
    try:
        model = HookedMLLM.from_hf(hf, AutoProcessor.from_pretrained(folder))
        got = score_all(model, data[1][:2], batch_size=BATCH, progress=False)
    finally:
        AlignDevicesHook.pre_forward = orig
    assert sum(c.endswith("DecoderLayer") for c in calls) >= n  # the layers' hooks fired
    torch.testing.assert_close(got["ram"].per_example, single["ram"].per_example[:2],
                               rtol=0, atol=1e-6)


def test_bf16_ram_in_range_and_close_to_fp32(tiny_folder, data, single):
    model = HookedMLLM.from_pretrained(tiny_folder("llava"), dtype=torch.bfloat16)
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16
    got = score_all(model, data[1][:4], batch_size=BATCH, progress=False)
    ram = got["ram"].per_example
    assert ram.dtype == torch.float32
    assert (ram >= 0).all() and (ram <= 1 + 1e-6).all()
    # The rows RAM sums are computed in fp32 from the model's bf16 q and k (pattern_rows(...,
    # torch.float32)), so the only bf16 error left is upstream: weights and activations rounded
    # to 8 mantissa bits (relative 2^-9 per rounding) perturb the logits of this tiny model
    # (|logit| <~ 1) by ~1e-3 and a probability mass by about that times the mass; measured
    # max |diff| is ~3e-5 (~1.3e-4 when the rows were still rounded to bf16). 1e-3 leaves
    # ~30x headroom and still fails a dtype or layout bug (masses here differ by ~1e-2+).
    diff = (ram - single["ram"].per_example[:4]).abs()
    assert diff.max() < 1e-3, float(diff.max())
    ref = HeadScores(single["ram"].per_example[:4].mean(0), "ram")
    assert got["ram"].compare(ref)["spearman"] > 0.9  # the same head ranking


def test_pattern_rows_fp32_from_bf16():
    """RAM's rows on a bf16 model: fp32 scores from the bf16 q/k, not bf16-rounded rows."""
    from corelens.core.attention import AttentionInputs

    g = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(1, 2, 6, 8, generator=g)).bfloat16(), torch.randn(1, 2, 6, 8,
                                                                          generator=g).bfloat16()
    half = AttentionInputs(0, q, k, k, None, 8 ** -0.5)
    full = AttentionInputs(0, q.float(), k.float(), k.float(), None, 8 ** -0.5)
    rows = torch.tensor([[3, 5]])
    got = half.pattern_rows(rows, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full.pattern_rows(rows), rtol=0, atol=1e-6)
    assert half.pattern_rows(rows).dtype == torch.bfloat16  # the default is unchanged


# ------------------------------------------------------------------------- patching sweeps
def _pairs(n: int) -> tuple[list, list]:
    """n clean examples and their corrupted partners: same prompt and image size, another
    image and another answer."""
    from dataclasses import replace

    from conftest import noise_image

    clean = grounded_examples("llava", n)
    corrupted = [replace(e, images=[noise_image(*e.images[0].size, 50 + i)],
                         answer="blue" if e.answer != "blue" else "red")
                 for i, e in enumerate(clean)]
    return clean, corrupted


def test_patch_pairs_is_the_batch_weighted_mean_and_resumes(tiny_model, tmp_path):
    from corelens.interventions.patching import patch_heads, prepare_pair
    from corelens.interventions.runs import patch_pairs

    model = tiny_model("llava")
    clean, corrupted = _pairs(5)
    whole = patch_pairs(model, clean, corrupted, batch_size=5, progress=False)
    pair = prepare_pair(model, clean, corrupted)
    ref = patch_heads(model, pair.clean, pair.corrupted, pair.logit_diff)
    torch.testing.assert_close(whole["scores"], ref, rtol=0, atol=1e-6)
    # batches of 2, 2, 1: the mean over pairs, weighted by batch size
    parts = [prepare_pair(model, clean[i:i + 2], corrupted[i:i + 2]) for i in (0, 2, 4)]
    by_hand = sum(patch_heads(model, p.clean, p.corrupted, p.logit_diff).double() * len(p.clean)
                  for p in parts) / 5
    partial = tmp_path / "patch.jsonl"
    got = patch_pairs(model, clean, corrupted, batch_size=2, partial=str(partial),
                      progress=False)
    torch.testing.assert_close(got["scores"], by_hand.float(), rtol=0, atol=1e-6)
    lines = partial.read_text().splitlines()
    partial.write_text(lines[0] + "\n")  # stopped after the first of 3 batches
    again = patch_pairs(model, clean, corrupted, batch_size=2, partial=str(partial),
                        progress=False)
    assert len(partial.read_text().splitlines()) == 3
    assert torch.equal(again["scores"], got["scores"]) and again["baseline"] == got["baseline"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "eap"])
def test_torchrun_patching_sweep_equals_one_process(tiny_folder, tiny_model, tmp_path, method):
    from corelens.interventions.runs import patch_pairs

    clean, corrupted = _pairs(5)
    save_jsonl(clean, tmp_path / "clean.jsonl")
    save_jsonl(corrupted, tmp_path / "corrupted.jsonl")
    ref = patch_pairs(tiny_model("llava"), load_jsonl(tmp_path / "clean.jsonl"),
                      load_jsonl(tmp_path / "corrupted.jsonl"), method=method, batch_size=2,
                      progress=False)
    out = tmp_path / "patch.json"
    run = _launch(["patch", "--model", tiny_folder("llava"), "--clean",
                   str(tmp_path / "clean.jsonl"), "--corrupted", str(tmp_path / "corrupted.jsonl"),
                   "--out", str(out), "--method", method, "--batch-size", "2"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["baseline"] == ref["baseline"] and got["n_pairs"] == 5
    if method == "exact":
        assert torch.equal(torch.tensor(got["patched"]), ref["scores"])
    else:
        from corelens.interventions.attribution.edges import EdgeScores

        torch.testing.assert_close(EdgeScores.from_dict(got["edges"]).scores,
                                   ref["edges"].scores, rtol=0, atol=0, equal_nan=True)
    # 3 batches, each computed once, dealt over the two ranks
    units = read_records(partial_files(str(out) + ".partial"))
    assert sorted(units) == [0, 1, 2]
    assert {f.name for f in partial_files(str(out) + ".partial")} == {
        "patch.json.partial.rank0.jsonl", "patch.json.partial.rank1.jsonl"}
