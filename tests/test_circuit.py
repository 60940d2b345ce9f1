"""Circuits over edges (``corelens.interventions.circuit``): the edge-level forward against
exact patching done with plain hooks, faithfulness curves (full graph = 1, empty = 0, CPR / CMD
by hand, the image in every forward) and ACDC (the planted circuit; its greedy decisions
replayed one circuit at a time)."""

from __future__ import annotations

import dataclasses
import json

import planted_circuit as pc
import pytest
import torch
from PIL import Image

from corelens import HookedMLLM, zoo
from corelens.errors import InputError
from corelens.heads import head_name
from corelens.hook_names import act_name
from corelens.interventions.attribution import edge_attribution
from corelens.interventions.attribution.edges import EdgeScores, Graph
from corelens.interventions.circuit import (
    MIB_FRACTIONS,
    AblatedSenders,
    acdc,
    area,
    faithfulness_curve,
    run_circuit,
)
from corelens.interventions.patching import prepare_pair
from corelens.report import toy_pairs


@pytest.fixture(scope="module")
def toy():
    model = zoo.load("toy-llava")
    pairs = toy_pairs(zoo.examples("toy-llava", 6, seed=31), zoo.task("toy-llava"))
    pair = prepare_pair(model, [c for c, _ in pairs], [x for _, x in pairs])
    return model, pair.clean, pair.corrupted, pair.logit_diff, pairs


def _metric(model, batch, metric, hooks=()):
    with torch.no_grad():
        logits = model.run_with_hooks(batch, fwd_hooks=list(hooks))
    return metric(logits, batch).float()


def _cache(model, batch, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
    return {n: cache[n] for n in names}


def _all_but(graph, drop):
    keep = graph.exists.clone()
    for s, r in drop:
        keep[graph.senders.index(s), graph.receivers.index(r)] = False
    return keep


def test_full_and_empty_circuits_are_the_clean_and_corrupted_runs(toy):
    model, clean, corrupt, metric, _ = toy
    graph = Graph.of(model)
    ablated = AblatedSenders.build(model, clean, "patching", corrupt)
    keep = torch.stack([graph.exists, torch.zeros_like(graph.exists)])
    got = run_circuit(model, clean, keep, ablated, metric, graph=graph)
    assert torch.equal(got[0], _metric(model, clean, metric))  # nothing ablated: untouched
    torch.testing.assert_close(got[1], _metric(model, corrupt, metric), atol=2e-4, rtol=1e-4)


def test_cutting_every_input_of_a_receiver_is_patching_that_input(toy):
    """All edges into L2H1.q (or L1KV3.v, or MLP2) ablated = that input patched from the
    corrupted run, done with plain hooks."""
    model, clean, corrupt, metric, _ = toy
    graph = Graph.of(model)
    ablated = AblatedSenders.build(model, clean, "patching", corrupt)
    cases = [("L2H1.q", act_name("q", 2), 1), ("L1KV3.v", act_name("v", 1), 3),
             ("MLP2", act_name("ln2_in", 2), None)]
    for receiver, hook_name, head in cases:
        j = graph.receivers.index(receiver)
        keep = graph.exists.clone()
        keep[:, j] = False
        got = run_circuit(model, clean, keep, ablated, metric, graph=graph)[0]
        src = _cache(model, corrupt, [hook_name])[hook_name]

        def patch(x, hook, head=head, src=src):
            x = x.clone()
            if head is None:
                return src
            x[:, :, head] = src[:, :, head]
            return x

        want = _metric(model, clean, metric, [(hook_name, patch)])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4, msg=receiver)


def test_cutting_every_output_of_a_sender_is_patching_it(toy):
    model, clean, corrupt, metric, _ = toy
    graph = Graph.of(model)
    ablated = AblatedSenders.build(model, clean, "patching", corrupt)
    for sender, layer, head in (("L1H2", 1, 2), ("L3H0", 3, 0)):
        keep = graph.exists.clone()
        keep[graph.senders.index(sender)] = False
        got = run_circuit(model, clean, keep, ablated, metric, graph=graph)[0]
        name = act_name("z", layer)
        src = _cache(model, corrupt, [name])[name]

        def patch(z, hook, head=head, src=src):
            z = z.clone()
            z[:, :, head] = src[:, :, head]
            return z

        want = _metric(model, clean, metric, [(name, patch)])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4, msg=sender)
    # zero ablation of an MLP's every output = zeroing that MLP's output
    zero = AblatedSenders.build(model, clean, "zero")
    keep = graph.exists.clone()
    keep[graph.senders.index("MLP1")] = False
    got = run_circuit(model, clean, keep, zero, metric, graph=graph)[0]
    want = _metric(model, clean, metric, [(act_name("mlp_out", 1), lambda x, hook: x * 0)])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_stacked_circuits_equal_one_at_a_time(toy):
    model, clean, corrupt, metric, _ = toy
    graph = Graph.of(model)
    ablated = AblatedSenders.build(model, clean, "mean", corrupt)
    g = torch.Generator().manual_seed(0)
    keep = (torch.rand(3, *graph.exists.shape, generator=g) < 0.5) & graph.exists
    together = run_circuit(model, clean, keep, ablated, metric, graph=graph)
    for c in range(3):
        alone = run_circuit(model, clean, keep[c], ablated, metric, graph=graph)[0]
        torch.testing.assert_close(together[c], alone, atol=1e-4, rtol=1e-4)


def test_faithfulness_curve_ends_and_areas(toy):
    model, clean, corrupt, metric, pairs = toy
    scores = edge_attribution(model, clean, corrupt, metric)
    curve = faithfulness_curve(model, clean, corrupt, scores, metric)
    assert curve.fractions == list(MIB_FRACTIONS) and curve.n_edges[-1] == Graph.of(model).n_edges
    assert curve.faithfulness[-1] == 1.0  # the whole graph is the clean run, exactly
    assert curve.metric[-1] == curve.full
    assert curve.n_edges[0] == int(0.001 * curve.n_edges[-1])
    # the areas by hand (trapezoids over the fractions)
    f, x = curve.faithfulness, curve.fractions
    cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1))
    cmd = sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
              for i in range(len(x) - 1))
    assert curve.cpr == pytest.approx(cpr, abs=1e-12) and curve.cmd == pytest.approx(cmd, abs=1e-12)
    assert area([0, 1], [0, 1]) == 0.5
    # a zero-edge circuit is the empty graph: faithfulness 0 exactly
    zero = faithfulness_curve(model, clean, corrupt, scores, metric, fractions=[0.0, 1.0])
    assert zero.faithfulness == [0.0, 1.0]
    # the image is in every forward: a blank clean image moves the curve
    blank = [dataclasses.replace(c, images=[Image.new("RGB", c.images[0].size, (0, 0, 0))])
             for c, _ in pairs]
    blank_pair = prepare_pair(model, blank, [x for _, x in pairs])
    other = faithfulness_curve(model, blank_pair.clean, blank_pair.corrupted, scores, metric)
    assert other.full != curve.full and other.metric != curve.metric
    with pytest.raises(InputError, match="fractions"):
        faithfulness_curve(model, clean, corrupt, scores, metric, fractions=[0.5, 0.1])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted-circuit-acdc")
    pc.build_planted_circuit(folder)
    model = HookedMLLM.from_pretrained(folder)
    clean, corrupt = pc.pairs(model)
    return model, clean, corrupt, pc.red_minus_green(model)


def test_acdc_finds_the_planted_chain_and_replays(planted):
    model, clean, corrupt, metric = planted
    found = acdc(model, clean, corrupt, metric, threshold=0.5)
    kept = {(s, r) for s, r, _ in found.circuit(threshold=0.5)}
    chain = {("embed", f"L0KV{pc.SENDER_KV}.v"), (head_name(pc.SENDER), f"L1KV{pc.RECEIVER_KV}.v"),
             (head_name(pc.RECEIVER), "logits")}
    assert chain <= kept, kept
    # the planted model routes the colour through the chain alone: the circuit is faithful
    curve = faithfulness_curve(model, clean, corrupt, found, metric,
                               fractions=[len(kept) / Graph.of(model).n_edges, 1.0])
    assert curve.faithfulness[0] == pytest.approx(1.0, abs=1e-3)
    # replay ACDC's greedy decisions one circuit at a time
    graph = Graph.of(model)
    ablated = AblatedSenders.build(model, clean, "patching", corrupt)
    keep = graph.exists.clone()
    current = float(run_circuit(model, clean, keep, ablated, metric, graph=graph).mean())
    for r in reversed(range(len(graph.receivers))):
        for s in reversed(range(len(graph.senders))):
            if not graph.exists[s, r]:
                continue
            trial = keep.clone()
            trial[s, r] = False
            m = float(run_circuit(model, clean, trial, ablated, metric, graph=graph).mean())
            if abs(m - current) < 0.5:
                keep, current = trial, m
    assert {(graph.senders[s], graph.receivers[r]) for s, r in keep.nonzero().tolist()} == kept
    assert isinstance(EdgeScores.from_dict(found.to_dict()), EdgeScores)


def test_circuit_cli_splits_and_scores(tmp_path, capsys):
    from corelens.cli import main

    out = tmp_path / "circuit.json"
    assert main(["circuit", "--model", "toy-llava", "--zoo-pairs", "10", "--method",
                 "eap,eap-ig,random", "--out", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())
    assert set(got["discovery"]).isdisjoint(got["evaluation"])
    assert len(got["discovery"]) + len(got["evaluation"]) == 10
    res = {r["method"]: r for r in got["results"]}
    assert all(r["curve"]["faithfulness"][-1] == 1.0 for r in res.values())
    assert res["eap"]["cpr"] > res["random"]["cpr"] + 0.3  # held out, far above chance
    printed = capsys.readouterr().out
    assert "CPR" in printed and "eap-ig" in printed
    with pytest.raises(InputError, match="--zoo-pairs|--clean"):
        main(["circuit", "--model", "toy-llava", "--out", str(out)])
    with pytest.raises(InputError, match="toy-llava's task asks shape"):
        main(["circuit", "--model", "toy-llava", "--zoo-pairs", "4", "--zoo-question",
              "relation", "--out", str(out)])


def test_circuit_cli_asks_one_question_type_of_a_mixed_task(tmp_path, monkeypatch):
    import corelens.cli.circuit as cli_circuit
    from corelens.cli import main

    seen = []

    def spy(model, pairs, *a, **kw):
        seen.extend(pairs)
        return real(model, pairs, *a, **kw)

    real = cli_circuit.circuit_benchmark
    monkeypatch.setattr(cli_circuit, "circuit_benchmark", spy)
    out = tmp_path / "circuit.json"
    assert main(["circuit", "--model", "toy-llava-2hop", "--zoo-pairs", "6", "--zoo-question",
                 "relation", "--method", "random", "--out", str(out), "--no-progress"]) == 0
    assert len(seen) == 6 and all(" left of the " in c.question for c, _ in seen)
    assert all(c.answer != r.answer for c, r in seen)  # the target recoloured
