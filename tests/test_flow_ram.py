"""Multi-hop RAM (``corelens.scores.flow``): against the rollout written out with the cached
attention patterns, and against plain RAM's top heads on the one-hop toy models (on scenes
other than those ALPHA was chosen on)."""

from __future__ import annotations

import pytest
import torch

from corelens import zoo
from corelens.hook_names import act_name
from corelens.scores.flow import ALPHA, flow_batch, flow_ram
from corelens.scores.ram import score_all
from corelens.scores.regions import RamParams, example_regions


def _by_hand(model, batch, alpha):
    """Every layer's rollout matrix from run_with_cache's patterns, composed explicitly."""
    L = model.cfg.n_layers
    names = [act_name("pattern", l) for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
    out = []
    for e, reg in enumerate(example_regions(batch, RamParams())):
        A = [cache[n][e].float().cpu() for n in names]  # [H, T, T]
        T = A[0].shape[-1]
        M = [alpha * torch.eye(T) + (1 - alpha) * a.mean(0) for a in A]
        ev = torch.zeros(T)
        ev[reg.evidence] = 1.0
        q = torch.zeros(T)
        q[reg.queries] = 1.0 / len(reg.queries)
        per_layer = []
        for l in range(L):
            up = ev.clone()
            for k in range(l):  # u_l = M_{l-1} ... M_0 1_R
                up = M[k] @ up
            down = q.clone()
            for k in reversed(range(l + 1, L)):  # w_l^T = e_q^T M_{L-1} ... M_{l+1}
                down = down @ M[k]
            per_layer.append(torch.stack([down @ A[l][h] @ up for h in range(A[l].shape[0])]))
        out.append(torch.stack(per_layer))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen-vl"])
def test_flow_equals_the_rollout_written_out(name):
    model = zoo.load(name)
    batch = model.prepare_examples(zoo.examples(name, 3, seed=61))
    for alpha in (0.5, ALPHA):
        torch.testing.assert_close(flow_batch(model, batch, alpha=alpha),
                                   _by_hand(model, batch, alpha), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-llava", "toy-llava-deep", "toy-qwen-vl"])
def test_one_hop_models_keep_plain_rams_top_heads(name):
    model = zoo.load(name)
    examples = zoo.examples(name, 32, seed=52)  # not the seed-51 scenes ALPHA was chosen on
    flow = flow_ram(model, examples, progress=False)
    ram = score_all(model, examples, progress=False)["ram"]
    assert set(flow.top(k=3)) == set(ram.top(k=3)), (flow.top(k=3), ram.top(k=3))
    assert flow.per_example.shape == (32, model.cfg.n_layers, model.cfg.n_heads)
