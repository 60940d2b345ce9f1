"""Multi-hop RAM (``flow_ram``): retrieval that reaches the answer through other tokens.

Plain RAM only sees DIRECT attention from the answer positions to the evidence. In a staged
circuit (a head at the anchor object's tokens copies the target's colour there; a later head at
the answer position reads the anchor) the evidence reaches the answer through another token,
and plain RAM misses both stages. ``flow_ram`` credits a head with the part of the attention
*rollout* (Abnar & Zuidema 2020) from the answer positions to the evidence that runs through it.

For example e, with A_{l,h} the attention of head h in layer l (all rows), Ā_l its mean over
heads and M_l = α I + (1 - α) Ā_l (a residual step and an attention step; α = ``ALPHA``):

- ``u_l`` (what each position holds of the evidence at layer l's input): u_0 = 1 on R_e,
  u_{l+1} = M_l u_l;
- ``w_l`` (how much the answer reads each position at layer l's output): w_{L-1} = the mean of
  e_q over q in Q_e, w_{l-1} = M_l^T w_l;
- **flow_ram(e, l, h) = w_l^T A_{l,h} u_l**, averaged over examples.

Summed over heads and weighted by (1 - α) / H, plus the residual path, it is the rollout mass
from Q_e to R_e. In the last layer w = e_q, and in layer 0 u = 1 on R_e: a one-hop head in the
last layer scores its plain RAM, a one-hop head earlier is weighted by how much of the answer's
rollout stays on its own position. Q_e, R_e are RAM's (``RamParams.query``, ``tau``).
Cost: one forward with every layer's full attention rows (taps, O(T^2) per layer) and the head
means kept for the backward pass (``[layers, batch, T, T]`` floats).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.core.attention import AttentionInputs
from corelens.data.batch import MultimodalBatch
from corelens.scores.head_scores import HeadScores
from corelens.scores.regions import RamParams, example_regions

# the residual share of a rollout step. Abnar & Zuidema use 0.5; 0.8 was chosen on 32 scenes of
# each one-hop toy model (seed 51), where it makes flow_ram's top 3 heads plain RAM's (0.5 lets
# later heads that read the answer's own position outrank the retrieval heads)
ALPHA = 0.8


def flow_batch(model: Any, batch: MultimodalBatch, params: RamParams | None = None,
               alpha: float = ALPHA) -> Float[Tensor, "example layer head"]:
    """``flow_ram`` of every head for each example of ``batch`` (one forward)."""
    params = params or RamParams()
    regions = example_regions(batch, params)
    L, B, T = model.cfg.n_layers, len(batch), batch.seq_len
    u = torch.zeros(B, T)
    for e, r in enumerate(regions):
        u[e, r.evidence] = 1.0
    means: list[Tensor | None] = [None] * L
    through: list[Tensor | None] = [None] * L  # A_{l,h} u_l: [B, H, T]
    state = {"u": u}

    def tap(inputs: AttentionInputs) -> None:
        if inputs.q.shape[2] != T:
            return  # a cached decoding step
        with torch.no_grad():
            rows = torch.arange(T, device=inputs.q.device).expand(B, T)
            a = inputs.pattern_rows(rows, torch.float32).cpu()  # [B, H, T, T]
            ul = state["u"]
            through[inputs.layer] = torch.einsum("bhqk,bk->bhq", a, ul)
            mean = a.mean(1)
            means[inputs.layer] = mean
            state["u"] = alpha * ul + (1 - alpha) * torch.einsum("bqk,bk->bq", mean, ul)

    with contextlib.ExitStack() as stack:
        for layer in range(L):
            stack.enter_context(model.attention.tap(layer, tap))
        with torch.no_grad():
            model(batch, return_type=None)
    if any(m is None for m in means):
        raise RuntimeError("flow_ram: the forward did not run every layer on this batch")
    w = torch.zeros(B, T)
    for e, r in enumerate(regions):
        w[e, r.queries] = 1.0 / len(r.queries)
    out = torch.zeros(B, L, through[0].shape[1])  # type: ignore[union-attr]
    for layer in reversed(range(L)):
        out[:, layer] = torch.einsum("bq,bhq->bh", w, through[layer])  # type: ignore[arg-type]
        w = alpha * w + (1 - alpha) * torch.einsum("bq,bqk->bk", w, means[layer])
    return out


def flow_ram(model: Any, examples: Sequence[Any], *, batch_size: int = 8,
             params: RamParams | None = None, alpha: float = ALPHA, dataset: str = "",
             progress: bool = True) -> HeadScores:
    """Multi-hop RAM of every head over grounded examples (see the module docstring):
    ``scores`` ``[layer, head]``, ``per_example`` ``[example, layer, head]``.

    Example:
        ```python
        from corelens import flow_ram, zoo

        model = zoo.load("toy-llava")
        flow = flow_ram(model, zoo.examples("toy-llava", 8, seed=0), progress=False)
        flow.scores.shape  # [layer, head]: [4, 4]
        flow.top(k=3)  # the heads most of the answer's rollout to the evidence runs through
        ```
    """
    params = params or RamParams()
    parts = []
    for start in tqdm(range(0, len(examples), batch_size), disable=not progress,
                      desc="flow_ram"):
        batch = model.prepare_examples(examples[start:start + batch_size])
        parts.append(flow_batch(model, batch, params, alpha))
    per_example = torch.cat(parts)
    return HeadScores(per_example.mean(0), "flow_ram", getattr(model, "name", ""), dataset,
                      len(per_example), {"tau": params.tau, "query": params.query,
                                         "alpha": alpha}, per_example)
