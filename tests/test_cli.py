"""The CLI: `corelens demo` runs the whole study on the shipped toy model; the report renders
offline in a real browser."""

from __future__ import annotations

import json

import pytest

from corelens.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--n", "96", "--pairs", "8"]) == 0
    return out


def test_demo_summary_shows_the_causal_claim(demo_out):
    """Heads chosen on the scoring set; the claim holds on the separate evaluation set."""
    s = json.loads((demo_out / "summary.json").read_text())
    assert s["core_heads"] and all(len(h) == 2 for h in s["core_heads"])
    scoring, evaluation = s["scoring"], s["evaluation"]
    assert scoring["n"] == evaluation["n"] == 96
    assert len(set(scoring["ids"])) == 96 and len(set(evaluation["ids"])) == 96
    assert not set(scoring["ids"]) & set(evaluation["ids"])
    assert {c for c, _ in evaluation["pairs"]} <= set(evaluation["ids"])
    assert "seed=2026" in scoring["source"] and "seed=2027" in evaluation["source"]
    ab = s["ablation"]
    assert ab["frac"] == 0.05 and ab["seeds"] >= 8
    assert ab["none"] >= 0.95
    assert ab["random"] - ab["top"] >= 0.2  # CoRe heads matter far more than random heads
    assert abs(ab["none"] - ab["bottom"]) < 0.02  # the bottom 5% barely matter
    assert s["seconds"] > 0 and s["random_model"] is False
    acc = s["acceleration"]
    assert acc["core_hybrid"] > acc["random_hybrid"] + 0.2  # CoRe heads are the ones to keep
    assert (demo_out / "report.html").stat().st_size > 10_000
    assert json.loads((demo_out / "ram.json").read_text())["metric"] == "ram"


@pytest.mark.slow
def test_report_renders_offline_in_headless_chromium(demo_out):
    import io

    import chromium
    import numpy as np
    from PIL import Image

    from corelens.views.plots import is_blank

    if not chromium.available():
        pytest.skip(chromium.INSTALL_HINT)
    res = chromium.render(demo_out / "report.html")
    assert res.requests == [] and res.dom["external"] == [], res.requests
    assert res.console_errors == [] and res.exceptions == [], (res.console_errors,
                                                                 res.exceptions)
    assert res.dom["images"] >= 4 and res.dom["images_loaded"] == res.dom["images"]
    assert all(w > 100 and h > 100 for w, h in res.dom["image_sizes"])  # overlays are visible
    assert res.dom["circuitsvis_rendered"] == res.dom["circuitsvis"] >= 1
    assert not is_blank(res.screenshot)
    shot = np.asarray(Image.open(io.BytesIO(res.screenshot)).convert("RGB"))
    assert (shot.std(axis=(0, 1)) > 5).any()


def test_families_lists_every_family(capsys):
    from corelens.families import FAMILIES

    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert all(cls in out for f in FAMILIES.values() for cls in f.hf_architectures)


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    assert "toy-llava" in capsys.readouterr().out


def test_score_and_ablate_commands(tmp_path):
    from corelens import HeadScores, save_jsonl, zoo
    from corelens.interventions.ablation import AblationCurve

    save_jsonl(zoo.examples("toy-llava", 16, seed=7), tmp_path / "data.jsonl")
    model = str(zoo.path("toy-llava"))
    assert main(["score", "--model", model, "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(tmp_path / "ram.json"), "--no-progress"]) == 0
    scores = HeadScores.load(tmp_path / "ram.json")
    assert scores.metric == "ram" and scores.n_examples == 16
    assert scores.top(k=1)[0] in [(0, 1), (0, 2)]  # the two retrieval heads
    assert main(["ablate", "--model", model, "--data", str(tmp_path / "data.jsonl"),
                 "--scores", str(tmp_path / "ram.json"), "--out", str(tmp_path / "abl.json"),
                 "--fracs", "0.05", "--seeds", "2"]) == 0
    curve = AblationCurve.load(tmp_path / "abl.json")
    assert curve.ks == [1] and len(curve.to_dict()["random_seeds"][0]) == 2


def test_patch_command(tmp_path):
    import torch

    from corelens import save_jsonl, zoo
    from corelens.zoo.scenes import recolor_target

    examples = zoo.examples("toy-llava", 4, seed=3)
    task = zoo.task("toy-llava")
    corrupted = [recolor_target(e, next(c for c in task.colors if c != e.answer),
                                task.background) for e in examples]
    save_jsonl(examples, tmp_path / "clean.jsonl")
    save_jsonl(corrupted, tmp_path / "corrupt.jsonl")
    assert main(["patch", "--model", str(zoo.path("toy-llava")), "--clean",
                 str(tmp_path / "clean.jsonl"), "--corrupted", str(tmp_path / "corrupt.jsonl"),
                 "--out", str(tmp_path / "p.json"), "--attribution"]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    effects = torch.tensor(res["patched"]) - res["baseline"]
    assert effects.shape == (4, 4)
    # restoring the clean answer's log-prob: the retrieval heads of layer 0 matter most
    assert effects.flatten().argmax() // 4 == 0


def test_accelerate_command(tmp_path):
    out = tmp_path / "accel.json"
    assert main(["accelerate", "--model", "toy-llava", "--data", "zoo:24:5", "--frac", "0.125",
                 "--window", "8", "--n-sink", "2", "--limit", "24", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["variants"]) == {"full", "core_hybrid", "random_hybrid", "fastv"}
    assert rep["evaluation"]["n"] == 24 and "seed=5" in rep["evaluation"]["source"]
    assert rep["scoring"]["n"] == 32 and "seed=6" in rep["scoring"]["source"]
    assert not set(rep["evaluation"]["ids"]) & set(rep["scoring"]["ids"])


def test_accelerate_on_a_jsonl_scores_on_one_half_and_evaluates_the_other(tmp_path):
    from corelens import save_jsonl, zoo
    from corelens.errors import InputError

    save_jsonl(zoo.examples("toy-llava", 12, seed=8), tmp_path / "d.jsonl")
    out = tmp_path / "accel.json"
    assert main(["accelerate", "--model", "toy-llava", "--data", str(tmp_path / "d.jsonl"),
                 "--frac", "0.125", "--window", "8", "--n-sink", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    ev, sc = set(rep["evaluation"]["ids"]), set(rep["scoring"]["ids"])
    assert len(ev) == len(sc) == 6 and not ev & sc
    assert "evaluation half" in rep["evaluation"]["source"]
    # a scoring set that overlaps the evaluation set is refused
    save_jsonl(zoo.examples("toy-llava", 4, seed=8), tmp_path / "s.jsonl")
    with pytest.raises(InputError, match="share"):
        main(["accelerate", "--model", "toy-llava", "--data", str(tmp_path / "d.jsonl"),
              "--score-data", str(tmp_path / "s.jsonl"), "--out", str(out)])


def test_a_study_splits_and_refuses_in_sample_claims(tmp_path):
    from corelens import zoo
    from corelens.errors import InputError
    from corelens.report import run_study, split_examples

    examples = zoo.examples("toy-llava", 10, seed=3)
    scoring, evaluation = split_examples(examples)
    assert len(scoring) == len(evaluation) == 5
    assert {e.id for e in scoring}.isdisjoint({e.id for e in evaluation})
    assert {e.id for e in scoring} | {e.id for e in evaluation} == {e.id for e in examples}
    assert [e.id for e in split_examples(examples)[1]] == [e.id for e in evaluation]  # seeded
    with pytest.raises(InputError, match="leave one empty"):
        split_examples(examples[:1])
    with pytest.raises(InputError, match="in-sample"):
        run_study(None, scoring, tmp_path, eval_examples=[scoring[0], *evaluation])
