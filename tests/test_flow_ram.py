"""Multi-hop RAM (``corelens.scores.flow``): both mixes against the recursion written out with
cached activations; against plain RAM's top heads on the one-hop toy models (on scenes other
than those ALPHA was chosen on); and on toy-llava-2hop, whose first retrieval stage plain RAM
cannot see, against the stage heads that path patching finds on other scenes."""

from __future__ import annotations

import pytest
import torch

from corelens import zoo
from corelens.hook_names import act_name
from corelens.scores.flow import ALPHA, flow_batch, flow_ram
from corelens.scores.ram import score_all
from corelens.scores.regions import RamParams, example_regions


def _compose(S, M, reg):
    """[layer, head]: e_q^T M_{L-1} ... M_{l+1} S_{l,h} M_{l-1} ... M_0 1_R, product by product."""
    T = M[0].shape[0]
    ev = torch.zeros(T)
    ev[reg.evidence] = 1.0
    q = torch.zeros(T)
    q[reg.queries] = 1.0 / len(reg.queries)
    per_layer = []
    for l in range(len(M)):
        up = ev.clone()
        for k in range(l):  # u_l = M_{l-1} ... M_0 1_R
            up = M[k] @ up
        down = q.clone()
        for k in reversed(range(l + 1, len(M))):  # w_l^T = e_q^T M_{L-1} ... M_{l+1}
            down = down @ M[k]
        per_layer.append(torch.stack([down @ S[l][h] @ up for h in range(S[l].shape[0])]))
    return torch.stack(per_layer)


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
        out.append(_compose(A, M, reg))
    return torch.stack(out)


def _by_hand_norms(model, batch):
    """The norm-based flow: every head's written vector A[i, j] v_j W_O^h built explicitly from
    the cached values and the HF o_proj weight, its norm and |x_i| (the residual stream before
    the layer) as shares of the row's total, composed layer by layer."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = [act_name(k, l) for l in range(L) for k in ("pattern", "v", "resid_pre")]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
    o_proj = {int(n.split("layers.")[1].split(".")[0]): m.weight.detach().float()
              for n, m in model.hf_model.named_modules()
              if n.endswith("o_proj") and "language_model.layers." in n}
    out = []
    for e, reg in enumerate(example_regions(batch, RamParams())):
        C, M = [], []
        for l in range(L):
            A = cache[act_name("pattern", l)][e].float()  # [H, T, T]
            v = cache[act_name("v", l)][e].float()  # [T, kv heads, d_head]
            v = v.repeat_interleave(H // v.shape[1], dim=1)
            d = v.shape[-1]
            written = torch.stack([v[:, h] @ o_proj[l][:, h * d:(h + 1) * d].T
                                   for h in range(H)])  # [H, T(key), d_model]
            vecs = A[..., None] * written[:, None]  # [H, T(query), T(key), d_model]
            c = vecs.norm(dim=-1)
            x = cache[act_name("resid_pre", l)][e].float().norm(dim=-1)  # [T]
            total = x + c.sum((0, 2))
            C.append(c / total[None, :, None])
            M.append(torch.diag(x / total) + (c / total[None, :, None]).sum(0))
        out.append(_compose(C, M, reg))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen-vl"])
def test_norm_flow_equals_the_recursion_written_out(name):
    model = zoo.load(name)
    batch = model.prepare_examples(zoo.examples(name, 3, seed=61))
    torch.testing.assert_close(flow_batch(model, batch, mix="norms"),
                               _by_hand_norms(model, batch), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen-vl"])
def test_flow_equals_the_rollout_written_out(name):
    model = zoo.load(name)
    batch = model.prepare_examples(zoo.examples(name, 3, seed=61))
    for alpha in (0.5, ALPHA):
        torch.testing.assert_close(flow_batch(model, batch, alpha=alpha, mix="rollout"),
                                   _by_hand(model, batch, alpha), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy-llava", "toy-llava-deep", "toy-qwen-vl"])
def test_one_hop_models_keep_plain_rams_top_heads(name):
    model = zoo.load(name)
    examples = zoo.examples(name, 32, seed=52)  # not the seed-51 scenes ALPHA was chosen on
    ram = score_all(model, examples, progress=False)["ram"]
    rollout = flow_ram(model, examples, mix="rollout", progress=False)
    assert set(rollout.top(k=3)) == set(ram.top(k=3)), (rollout.top(k=3), ram.top(k=3))
    assert rollout.per_example.shape == (32, model.cfg.n_layers, model.cfg.n_heads)
    # the norm-based mix has no parameter to choose; it keeps plain RAM's top 2 (top 3 on the
    # LLaVA models; on toy-qwen-vl its third is L3H0 where RAM's is L2H3)
    norms = flow_ram(model, examples, progress=False)
    assert norms.params["mix"] == "norms"
    assert norms.top(k=2) == ram.top(k=2), (norms.top(k=3), ram.top(k=3))


@pytest.mark.slow
def test_norm_flow_sees_both_stages_of_the_two_hop_model():
    """toy-llava-2hop (docs/zoo.md): stage-1 heads in layer 0 copy the target's colour into the
    anchor's token, layer 1 reads the anchor. Which layer-0 heads are stage 1 is decided
    causally on one set (path patching from the head into the layer-1 values moves >= 15% of the
    logit difference); on another set plain RAM gives layer 0 ~0, and the norm-based flow ranks
    those stage-1 heads and the layer-1 heads above the other layer-0 heads by a margin (1.3x;
    set after seeing seeds 4242-4244, where the norms give 1.7x on this set)."""
    from corelens.scores.ram import score_heads
    from corelens.zoo.scenes import make_examples
    from corelens.zoo.two_hop import only, path_effects

    name = "toy-llava-2hop"
    model, task = zoo.load(name), only(zoo.task(name), "relation")
    H = model.cfg.n_heads
    pick = make_examples(task, 64, seed=4243)
    moved = {h: path_effects(model, pick, task.colors, (0, h), (1, 0))[
        f"L0H{h} -> values of all heads in layers > 0, MLPs recomputed"] for h in range(H)}
    stage1 = {(0, h) for h, m in moved.items() if m >= 0.15}
    others = {(0, h) for h in range(H)} - stage1
    assert stage1 and others, moved

    # seed 4244: not the scenes the norm mix was chosen on (4242, 4243)
    examples = make_examples(task, 96, seed=4244)
    ram = score_heads(model, examples, "ram", progress=False)
    assert max(float(ram[h]) for h in stage1 | others) < 1e-3  # plain RAM: blind to stage 1
    flow = flow_ram(model, examples, progress=False)
    found = stage1 | {(1, h) for h in range(H)}
    # clearly above, not by a hair: the rollout (mix="rollout") orders them right on these 96
    # scenes by 1.1x and fails the order on 256 of the same seed; the norms separate them by 1.7x
    assert min(float(flow[h]) for h in found) > 1.3 * max(float(flow[h]) for h in others), (
        moved, flow.rank())
