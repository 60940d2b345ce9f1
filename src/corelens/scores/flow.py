"""Multi-hop RAM (``flow_ram``): retrieval that reaches the answer through other tokens.

Plain RAM only sees DIRECT attention from the answer positions to the evidence. In a staged
circuit (a head at the anchor object's tokens copies the target's colour there; a later head at
the answer position reads the anchor) the evidence reaches the answer through another token,
and plain RAM misses both stages. ``flow_ram`` credits a head with the part of the flow from
the answer positions back to the evidence that runs through it, composed over layers.

Each layer l is one step: a matrix S_{l,h} per head and a residual share r_l with
M_l = diag(r_l) + sum_h S_{l,h} (rows summing to 1). For example e:

- ``u_l`` (what each position holds of the evidence at layer l's input): u_0 = 1 on R_e,
  u_{l+1} = M_l u_l;
- ``w_l`` (how much the answer reads each position at layer l's output): w_{L-1} = the mean of
  e_q over q in Q_e, w_{l-1} = M_l^T w_l;
- **flow_ram(e, l, h) = w_l^T S_{l,h} u_l**, averaged over examples.

Two mixes:

- ``"norms"`` (default; Kobayashi et al. 2021): S_{l,h}[i, j] = |A_{l,h}[i, j] v_j W_O^h| / Z_i
  and r_l[i] = |x_i| / Z_i, with x_i the residual stream entering layer l and Z_i the sum of
  both over heads and keys: each head is weighted by how much it actually writes, the residual
  by its own size. No parameter.
- ``"rollout"`` (Abnar & Zuidema 2020): S_{l,h} = A_{l,h} for the score, M_l = α I + (1 - α)
  Ā_l (Ā_l the head mean; α = ``ALPHA``) for the propagation; with ``RamParams.value_weighted``
  A is weighted by |v_j W_O^h| and renormalised over keys. A one-hop head in the last layer
  scores its plain RAM.

On toy-llava-2hop the rollout cannot tell the stage-1 head from a layer-0 head that attends
alike but writes little; the norms can (docs/ram.md). Q_e, R_e are RAM's (``RamParams.query``,
``tau``). Cost: one forward with every layer's full attention rows (taps, O(T^2) per layer)
and one [batch, T, T] matrix per layer kept for the backward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.core.attention import AttentionInputs
from corelens.data.batch import MultimodalBatch
from corelens.hook_names import act_name
from corelens.scores.head_scores import HeadScores
from corelens.scores.regions import RamParams, example_regions, key_weights

# the residual share of a rollout step. Abnar & Zuidema use 0.5; 0.8 was chosen on 32 scenes of
# each one-hop toy model (seed 51), where it makes flow_ram's top 3 heads plain RAM's (0.5 lets
# later heads that read the answer's own position outrank the retrieval heads)
ALPHA = 0.8

Mix = Literal["rollout", "norms"]


def flow_batch(model: Any, batch: MultimodalBatch, params: RamParams | None = None,
               alpha: float = ALPHA, mix: Mix = "norms") -> Float[Tensor, "example layer head"]:
    """``flow_ram`` of every head for each example of ``batch`` (one forward)."""
    params = params or RamParams()
    regions = example_regions(batch, params)
    L, B, T = model.cfg.n_layers, len(batch), batch.seq_len
    u = torch.zeros(B, T)
    for e, r in enumerate(regions):
        u[e, r.evidence] = 1.0
    # layer l's step: u <- kept * u + moved @ u (rows of diag(kept) + moved sum to 1)
    steps: list[tuple[Tensor, Tensor] | None] = [None] * L
    through: list[Tensor | None] = [None] * L  # S_{l,h} u_l: [B, H, T]
    resid: dict[int, Tensor] = {}
    state = {"u": u}

    def keep_norm(x: Tensor, hook: Any) -> None:
        resid[int(hook.name.split(".")[1])] = x.detach().float().norm(dim=-1).cpu()

    def tap(inputs: AttentionInputs) -> None:
        if inputs.q.shape[2] != T:
            return  # a cached decoding step
        with torch.no_grad():
            rows = torch.arange(T, device=inputs.q.device).expand(B, T)
            a = inputs.pattern_rows(rows, torch.float32).cpu()  # [B, H, T, T]
            if mix == "norms":  # |A[i, j] v_j W_O^h| and |x_i|, shares of their row total
                a = a * key_weights(model, inputs).cpu()[:, :, None, :]
                total = resid[inputs.layer] + a.sum((1, 3))
                a = a / total[:, None, :, None].clamp_min(1e-30)
                kept, moved = resid[inputs.layer] / total.clamp_min(1e-30), a.sum(1)
            else:
                if params.value_weighted:  # A[i, j] |v_j W_O^h|, renormalised over keys
                    a = a * key_weights(model, inputs).cpu()[:, :, None, :]
                    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
                kept, moved = torch.full((B, T), alpha), (1 - alpha) * a.mean(1)
            ul = state["u"]
            through[inputs.layer] = torch.einsum("bhqk,bk->bhq", a, ul)
            steps[inputs.layer] = (kept, moved)
            state["u"] = kept * ul + torch.einsum("bqk,bk->bq", moved, ul)

    hooks = [(act_name("ln1_in", layer), keep_norm) for layer in range(L)] if mix == "norms" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        for layer in range(L):
            stack.enter_context(model.attention.tap(layer, tap))
        with torch.no_grad():
            model(batch, return_type=None)
    if any(step is None for step in steps):
        raise RuntimeError("flow_ram: the forward did not run every layer on this batch")
    w = torch.zeros(B, T)
    for e, r in enumerate(regions):
        w[e, r.queries] = 1.0 / len(r.queries)
    out = torch.zeros(B, L, through[0].shape[1])  # type: ignore[union-attr]
    for layer in reversed(range(L)):
        out[:, layer] = torch.einsum("bq,bhq->bh", w, through[layer])  # type: ignore[arg-type]
        kept, moved = steps[layer]  # type: ignore[misc]
        w = kept * w + torch.einsum("bq,bqk->bk", w, moved)
    return out


def flow_ram(model: Any, examples: Sequence[Any], *, batch_size: int = 8,
             params: RamParams | None = None, alpha: float = ALPHA, mix: Mix = "norms",
             dataset: str = "", progress: bool = True) -> HeadScores:
    """Multi-hop RAM of every head over grounded examples (see the module docstring):
    ``scores`` ``[layer, head]``, ``per_example`` ``[example, layer, head]``. ``mix="norms"``
    weighs heads and the residual stream by the norms of what they write; ``"rollout"`` is the
    attention rollout with residual share ``alpha``.

    Example:
        ```python
        from corelens import flow_ram, zoo

        model = zoo.load("toy-llava")
        flow = flow_ram(model, zoo.examples("toy-llava", 8, seed=0), progress=False)
        flow.scores.shape  # [layer, head]: [4, 4]
        flow.top(k=3)  # the heads most of the answer's flow back to the evidence runs through
        ```
    """
    params = params or RamParams()
    parts = []
    for start in tqdm(range(0, len(examples), batch_size), disable=not progress,
                      desc="flow_ram"):
        batch = model.prepare_examples(examples[start:start + batch_size])
        parts.append(flow_batch(model, batch, params, alpha, mix))
    per_example = torch.cat(parts)
    return HeadScores(per_example.mean(0), "flow_ram", getattr(model, "name", ""), dataset,
                      len(per_example), {"tau": params.tau, "query": params.query,
                                         "mix": mix, "alpha": alpha if mix == "rollout" else None,
                                         "value_weighted": params.value_weighted or mix == "norms"},
                      per_example)
