"""The shipped SAE of the CoRe-meets-SAEs study (``python -m corelens.zoo.sae_study``,
docs/saes.md): it loads, its recorded held-out metrics reproduce, it splices without changing
the logits, and the recorded colour features change the answer as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import corelens.zoo as zoo
from corelens.saes import SAE, ActivationStore, evaluate, run_with_saes
from corelens.zoo.sae_study import run_condition, shipped_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sae_study.json"


@pytest.fixture(scope="module")
def results():
    res = json.loads(RESULTS.read_text())
    assert res["complete"]
    return res


@pytest.fixture(scope="module")
def model(results):
    torch.set_num_threads(1)
    return zoo.load(results["config"]["model"])


@pytest.fixture(scope="module")
def sae(results):
    return SAE.load(shipped_dir(results["ram"]["hook_name"], results["config"]["model"]))


def recorded_set(results, name, n):
    """The first ``n`` examples of recorded set ``name``, checked against the recorded ids."""
    info = results["sets"][name]
    examples = zoo.examples(results["config"]["model"], n, seed=info["seed"])
    assert [e.id for e in examples] == info["ids"][:n]
    return examples


def test_the_shipped_sae_loads_is_small_and_sits_after_the_retrieval_layer(results, sae):
    folder = shipped_dir(results["ram"]["hook_name"], results["config"]["model"])
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "metrics.json"} <= set(files)
    assert sum(files.values()) < 2 ** 20
    assert sae.cfg.architecture == "topk" and sae.cfg.d_sae == results["config"]["d_sae"]
    assert sae.cfg.metadata.hook_name == f"blocks.{results['ram']['retrieval_layer']}" \
                                         ".hook_resid_post"
    # the layer is the top RAM heads' (toy-llava retrieves in layer 0, docs/zoo.md)
    assert results["ram"]["top"][0]["head"].startswith(f"L{results['ram']['retrieval_layer']}H")
    shipped = json.loads((folder / "metrics.json").read_text())
    assert shipped["metrics"] == results["sae"]["metrics"]
    # the sets are disjoint
    ids = [set(s["ids"]) for s in results["sets"].values()]
    assert sum(map(len, ids)) == len(set().union(*ids))


def test_recorded_held_out_explained_variance_and_l0_reproduce(results, model, sae):
    recorded = results["sae"]["metrics"]
    held_out = recorded_set(results, "sae_eval", 64)
    got = evaluate(sae, ActivationStore(model, held_out, sae.cfg.metadata.hook_name,
                                        batch_size=64, progress=False))
    first = recorded["first_64"]["all"]
    assert got["explained_variance"] == pytest.approx(first["explained_variance"], abs=1e-4)
    assert got["l0"] == pytest.approx(first["l0"], abs=1e-3)
    # and the subset agrees with the whole recorded held-out set
    assert got["explained_variance"] == pytest.approx(recorded["all"]["explained_variance"],
                                                      abs=0.005)
    assert got["l0"] == pytest.approx(recorded["all"]["l0"], abs=0.5)


def test_splicing_the_sae_with_its_error_term_leaves_the_logits_unchanged(results, model, sae):
    batch = model.prepare_examples(recorded_set(results, "evaluation", 8))
    with torch.no_grad():
        base = model(batch)
        spliced = run_with_saes(model, batch, [sae], use_error_term=True)
        without = run_with_saes(model, batch, [sae], use_error_term=False)
    assert (spliced - base).abs().max() <= 1e-6
    assert (without - base).abs().max() > 1e-4  # the SAE is really in the forward
    assert results["conditions"]["sae_error_term"]["max_abs_logit_diff_vs_clean"] <= 1e-6


def test_the_recorded_colour_features_change_the_answer_logprob_as_recorded(results, model,
                                                                          sae):
    n = results["config"]["per_colour"]
    name = f"colour_features_n{n}"
    recorded = results["conditions"][name]["delta_logprob"]
    assert recorded < -0.5  # what the study found: ablating them lowers the answer log-prob
    examples = recorded_set(results, "evaluation", 24)
    specs = results["specs"]
    clean = run_condition(model, examples, {"kind": "clean"}, batch_size=24)
    ablated = run_condition(model, examples, specs[name], sae, batch_size=24)
    control = run_condition(model, examples, specs[f"random_features_n{n}_s0"], sae,
                            batch_size=24)
    delta = ablated["mean_logprob"] - clean["mean_logprob"]
    assert delta < -0.25 and (delta < 0) == (recorded < 0)
    assert abs(control["mean_logprob"] - clean["mean_logprob"]) < abs(delta) / 4


def test_docs_show_the_recorded_table(results):
    doc = (ROOT / "docs" / "saes.md").read_text()
    missing = [line for line in results["table"].splitlines() if line and line not in doc]
    assert not missing, "docs/saes.md is stale; paste the study's table:\n" + "\n".join(missing)
