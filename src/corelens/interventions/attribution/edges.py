"""Edge attribution: EAP and EAP-IG over embeddings, heads, MLPs and the logits (see the package
doc); ``EdgeScores`` holds the result."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.heads import head_name, kv_head_name
from corelens.hook_names import EMBED, FINAL_NORM_IN, act_name
from corelens.interventions.attribution.common import (
    backward,
    interpolate,
    n_kv_heads,
    warn_side_inputs,
)
from corelens.interventions.core import Metric, cache_activations, check_aligned

Edge = tuple[str, str, float]


# --- edge attribution: EAP and EAP-IG ------------------------------------------------------
@dataclass
class EdgeScores:
    """Edge attribution scores ``[sender, receiver]`` (NaN where no edge exists: a receiver
    that is not downstream of the sender).

    Senders: ``"embed"`` (the decoder's input embeddings, vision tokens included), ``"L{l}H{h}"``
    (a head's output), ``"MLP{l}"``. Receivers: ``"L{l}H{h}.q"``, ``"L{l}KV{g}.k"``,
    ``"L{l}KV{g}.v"`` (KV heads: a k / v input is shared by the KV group under GQA),
    ``"MLP{l}"``, ``"logits"``. A score estimates the change of the metric when only that
    edge carries the source's activation into the target run (``path_patch`` of one sender to
    one receiver with MLPs frozen, minus the baseline).
    """

    senders: list[str]
    receivers: list[str]
    scores: Float[Tensor, "sender receiver"]
    method: str = "eap"
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, edge: tuple[str, str]) -> float:
        return float(self.scores[self.senders.index(edge[0]), self.receivers.index(edge[1])])

    def edges(self) -> list[Edge]:
        """Every edge, sorted by |score| (largest first)."""
        s, r = torch.nonzero(~torch.isnan(self.scores), as_tuple=True)
        vals = self.scores[s, r]
        order = torch.argsort(vals.abs(), descending=True, stable=True)
        return [(self.senders[int(s[i])], self.receivers[int(r[i])], float(vals[i]))
                for i in order]

    def top(self, k: int = 10) -> list[Edge]:
        """The ``k`` edges with the largest |score|."""
        return self.edges()[:k]

    def circuit(self, k: int | None = None, threshold: float | None = None) -> list[Edge]:
        """A circuit: the top-``k`` edges by |score|, or every edge with |score| >= threshold."""
        if (k is None) == (threshold is None):
            raise InputError("circuit() takes exactly one of k= or threshold=")
        edges = self.edges()
        return edges[:k] if k is not None else [e for e in edges if abs(e[2]) >= threshold]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "senders": self.senders, "receivers": self.receivers,
                "scores": [[None if math.isnan(v) else v for v in row]
                           for row in self.scores.tolist()], "meta": self.meta}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "EdgeScores":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EdgeScores":
        scores = torch.tensor([[math.nan if v is None else v for v in row]
                               for row in d["scores"]], dtype=torch.float32)
        return cls(d["senders"], d["receivers"], scores, d["method"], d.get("meta", {}))


# --- the graph
@dataclass(frozen=True)
class Graph:
    """The senders and receivers of a model's edge graph and which edges exist (a receiver reads
    a sender if it lies downstream: later layer, or the same layer's MLP reading its heads)."""

    senders: list[str]
    receivers: list[str]
    exists: Bool[Tensor, "sender receiver"]

    @classmethod
    def of(cls, model: Any) -> "Graph":
        L, H, G = model.cfg.n_layers, model.cfg.n_heads, n_kv_heads(model)
        senders = ["embed"] + [head_name((l, h)) for l in range(L) for h in range(H)] + [
            f"MLP{l}" for l in range(L)]
        receivers, layer_of = [], []
        for l in range(L):
            names = ([f"{head_name((l, h))}.q" for h in range(H)]
                     + [f"{kv_head_name((l, g))}.{kind}" for kind in ("k", "v") for g in range(G)]
                     + [f"MLP{l}"])
            receivers += names
            layer_of += [l] * len(names)
        receivers.append("logits")
        layer_of.append(L)
        r_layer = torch.tensor(layer_of)
        r_mlp = torch.tensor([r.startswith("MLP") for r in receivers])
        exists = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
        exists[0] = True
        for l in range(L):
            exists[1 + l * H:1 + (l + 1) * H] = (r_layer > l) | ((r_layer == l) & r_mlp)
            exists[1 + L * H + l] = r_layer > l
        return cls(senders, receivers, exists)

    @property
    def n_edges(self) -> int:
        return int(self.exists.sum())

    def mask(self, edges: Sequence[tuple[str, str]] | Sequence[tuple[str, str, float]]
             ) -> Bool[Tensor, "sender receiver"]:
        """The boolean ``[sender, receiver]`` mask of ``edges`` (``(sender, receiver)`` pairs or
        ``EdgeScores.edges()`` triples)."""
        s_index = {s: i for i, s in enumerate(self.senders)}
        r_index = {r: i for i, r in enumerate(self.receivers)}
        out = torch.zeros_like(self.exists)
        for e in edges:
            try:
                i, j = s_index[e[0]], r_index[e[1]]
            except KeyError as err:
                raise InputError(f"edge {e[0]!r} -> {e[1]!r} is not in this model's graph "
                                 f"(unknown {err.args[0]!r})") from None
            if not self.exists[i, j]:
                raise InputError(f"edge {e[0]!r} -> {e[1]!r} does not exist: the receiver does "
                                 "not read that sender")
            out[i, j] = True
        return out

    def top(self, scores: EdgeScores, n: int) -> Bool[Tensor, "sender receiver"]:
        """The mask of the ``n`` edges with the largest |score| (ties: ``EdgeScores.edges``)."""
        self.check_scores(scores)
        return self.mask(scores.edges()[:n])

    def check_scores(self, scores: EdgeScores) -> None:
        if scores.senders != self.senders or scores.receivers != self.receivers:
            raise InputError("these edge scores are for another graph (other senders / "
                             "receivers): compute them on this model")


def decoder_blocks(model: Any) -> list[Any]:
    return list(model.bridge.blocks)


def check_eap_supported(model: Any) -> None:
    if model.family.sandwich_norms:
        raise InputError(f"edge attribution needs per-head residual contributions; the "
                         f"{model.family.name} family normalises the attention and MLP outputs "
                         "before the residual add (sandwich norms), so heads do not add up")


def projection_weight(linear: Any, n: int, name: str) -> Float[Tensor, "n d_head d_model"]:
    w = getattr(getattr(linear, "original_component", linear), "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise InputError(f"edge attribution reads {name} as a plain linear weight; this "
                         "model's projection has none (quantised?)")
    return w.float().view(n, -1, w.shape[1])


def _pull_back(norm: Any, x: Tensor, u: Tensor) -> Tensor:
    """VJP of ``norm`` at x ([N, t, d]) for each of the cotangents u ([n, N, t, d])."""
    xs = x.detach().unsqueeze(0).expand(u.shape[0], *x.shape).clone().requires_grad_(True)
    with torch.enable_grad():
        y = norm(xs)
        (g,) = torch.autograd.grad(y, xs, grad_outputs=u.to(y.dtype))
    return g.float()


def _receiver_grads(model: Any, layer: int, acts: dict[str, Tensor],
                    grads: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    """dM/d(input of each receiver of ``layer``), [receiver, N, t, d_model]: q / k / v of every
    (KV) head, then the MLP — each gradient pulled back through its own projection slice and
    the layer's norm only."""
    block = decoder_blocks(model)[layer]
    ln1 = getattr(block.ln1, "original_component", block.ln1)
    ln2 = getattr(block.ln2, "original_component", block.ln2)
    x = acts[act_name("resid_pre", layer)]
    labels, parts = [], []
    for kind in ("q", "k", "v"):
        g = grads[act_name(kind, layer)].float()  # [N, t, n, d_head]
        n = g.shape[2]
        w = projection_weight(getattr(block.attn, kind), n, f"W_{kind.upper()}")
        u = torch.einsum("Ntnk,nkd->nNtd", g, w.to(g.device))
        parts.append(_pull_back(ln1, x, u))
        name = head_name if kind == "q" else kv_head_name
        labels += [f"{name((layer, i))}.{kind}" for i in range(n)]
    g = grads[act_name("mlp_in", layer)].float()
    parts.append(_pull_back(ln2, acts[act_name("resid_mid", layer)], g.unsqueeze(0)))
    labels.append(f"MLP{layer}")
    return labels, torch.cat(parts)


def edge_attribution(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, method: Literal["eap", "eap-ig"] = "eap", steps: int = 5, steps_per_forward: int = 5,
    progress: bool = False,
) -> EdgeScores:
    """EAP (``method="eap"``) or EAP-IG (``"eap-ig"``, ``steps`` interpolation points) scores
    of every edge between the input embeddings, heads, MLPs and the logits (see the module
    docstring). Batched: one backward gives every receiver's gradient; EAP-IG runs its steps as
    ``steps_per_forward`` stacked copies per forward."""
    check_aligned(source, target)
    check_eap_supported(model)
    if method not in ("eap", "eap-ig"):
        raise InputError(f"method must be 'eap' or 'eap-ig', not {method!r}")
    m = 1 if method == "eap" else int(steps)
    if m < 1:
        raise InputError("EAP-IG needs steps >= 1")
    warn_side_inputs(model, method)
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(target)
    emb = EMBED
    z_names = [act_name("z", l) for l in range(L)]
    mlp_names = [act_name("mlp_out", l) for l in range(L)]
    src = cache_activations(model, source, [emb, *z_names, *mlp_names])
    tgt = cache_activations(model, target, [emb, *z_names, *mlp_names])
    names = [emb] + [act_name(n, l) for l in range(L)
                     for n in ("resid_pre", "resid_mid", "q", "k", "v", "mlp_in")]
    names = list(dict.fromkeys(names + [FINAL_NORM_IN]))

    graph = Graph.of(model)
    senders = graph.senders
    deltas = {"embed": (src[emb] - tgt[emb]).float()}
    for l in range(L):
        deltas[z_names[l]] = (src[z_names[l]] - tgt[z_names[l]]).float()
        deltas[mlp_names[l]] = (src[mlp_names[l]] - tgt[mlp_names[l]]).float()
    w_o = []
    for l in range(L):
        w = projection_weight(decoder_blocks(model)[l].attn.o, 1, "W_O")[0]  # [d_model, H * d_head]
        w_o.append(w.view(w.shape[0], H, -1))

    def contract(g: Tensor, layer: int) -> Tensor:
        """[sender, receiver] contributions of one receiver layer's gradients g
        ([receiver, B, t, d_model]); ``layer`` = L for the logits. Scores are linear in g, so
        the interpolation chunks add up; edges that do not exist are masked later."""
        out = torch.zeros(len(senders), g.shape[0])
        out[0] = torch.einsum("rbtd,btd->r", g, deltas["embed"].to(g.device)).cpu()
        for l in range(min(layer + 1, L)):
            take = g if l < layer else g[-1:]  # same layer: only its MLP reads its heads
            per_head = torch.einsum("rbtd,dhk,bthk->hr", take, w_o[l].to(g.device),
                                    deltas[z_names[l]].to(g.device)).cpu()
            out[1 + l * H:1 + (l + 1) * H, g.shape[0] - take.shape[0]:] = per_head
            if l < layer:
                out[1 + L * H + l] = torch.einsum("rbtd,btd->r", g, deltas[mlp_names[l]].to(
                    g.device)).cpu()
        return out

    # sum over the m interpolation runs of the per-receiver gradients (EAP: m = 1, the target),
    # contracted with the senders one receiver layer at a time
    alphas = [k / m for k in range(1, m + 1)]
    labels: list[str] = []
    scores: Tensor | None = None
    steps_per_forward = max(1, int(steps_per_forward))
    features: dict[str, Any] = {}
    for start in tqdm(range(0, m, steps_per_forward), disable=not progress, desc=method):
        part = alphas[start:start + steps_per_forward]
        c = len(part)
        edits = [interpolate(src[emb], part, B)] if m > 1 else []
        acts, grads = backward(model, target, metric, names, copies=c, edits=edits,
                                features=features)
        labels, blocks = [], []
        for l in range(L + 1):
            if l < L:
                lab, g = _receiver_grads(model, l, acts, grads)
            else:
                lab, g = ["logits"], grads[FINAL_NORM_IN].float().unsqueeze(0)
            labels += lab
            blocks.append(contract(g.view(g.shape[0], c, B, *g.shape[2:]).sum(1), l))
            del g
        part_scores = torch.cat(blocks, dim=1)
        scores = part_scores if scores is None else scores + part_scores
        del acts, grads
    assert scores is not None
    scores = (scores / m).detach()  # the metric's 1/B is already inside the gradients

    if labels != graph.receivers:
        raise AssertionError("edge attribution's receivers are out of the graph's order")
    scores[~graph.exists] = math.nan  # no edge unless the receiver reads the sender's output
    return EdgeScores(senders, labels, scores, method,
                      {"steps": m, "n_examples": B, "n_layers": L, "n_heads": H,
                       "n_kv_heads": n_kv_heads(model)})
