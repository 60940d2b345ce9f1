"""Gradient-based attribution: AtP, AtP* (QK fix, GradDrop), EAP and EAP-IG.

Same conventions as ``corelens.patching``: the *target* run is the one differentiated, the
*source* supplies the patched activations, ``metric(logits, batch) -> [batch]`` is averaged over
examples, and every forward carries the whole ``MultimodalBatch`` (images, position ids).

Nodes (``attribute_heads``): ``"z"`` a head's output (what ``patch_heads`` patches), ``"q"`` a
query head's query input (``hook_q``), ``"k"`` / ``"v"`` a KV head's key / value input (one per
KV group under GQA).

- AtP (Nanda 2023; Kramar et al. 2024): grad(metric at target) . (a_source - a_target), summed
  over positions and features — a first-order estimate of ``patch_heads(..., node) - baseline``.
- AtP* (Kramar et al. 2024) adds (a) the QK fix: for a q (k) node the attention pattern of the
  head (of every head of the KV group) is recomputed exactly with the source's queries (keys)
  and only the step from the pattern to the metric is linearised,
  ``sum grad_pattern . (pattern_patched - pattern_target)``; and (b) GradDrop: for each layer l
  an estimate c_l with the gradient through layer l's residual contributions (attention and MLP
  outputs) zeroed, combined per example as ``sum_l |c_l| / (L - 1)`` and averaged over
  examples — a magnitude (nodes in layer l get c_l = 0, hence L - 1). All L backward passes
  run as one batched backward (``repeat_batch``).
- EAP (Syed et al. 2023): edges sender -> receiver, senders = the decoder's input embeddings
  (text and vision tokens), every head's output (z_h W_O_h), every MLP output; receivers = each
  query head's q input, each KV head's k and v inputs, each MLP's input, the logits. Score =
  (a_u^source - a_u^target) . dM/d(input of v): the gradient at ``hook_q`` / ``hook_k`` /
  ``hook_v`` / ``mlp.hook_in`` pulled back through that layer's norm and the head's slice of
  W_Q / W_K / W_V alone (a local autograd step per layer), so no split-qkv model is needed.
- EAP-IG (Hanna et al. 2024): the same with dM/d(input of v) averaged over ``steps`` runs whose
  decoder input embeddings lie on the straight line from the source's to the target's,
  ``x_k = x_s + (k / m)(x_t - x_s)``, k = 1..m (m = 1 is EAP); the m runs form one batch.

Architectures whose attention / MLP output passes through a norm before the residual add
(Gemma3's sandwich norms) have no per-head residual contribution: EAP refuses them.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from corelens.attention import AttentionInputs
from corelens.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.heads import head_name, kv_head_name, parse_head
from corelens.interventions import (
    Metric,
    act_name,
    cache_activations,
    check_aligned,
    image_features,
    stacked,
)

Node = Literal["z", "q", "k", "v"]
Edge = tuple[str, str, float]


# --- shared machinery ----------------------------------------------------------------------
def _n_kv(model: Any) -> int:
    return int(model.cfg.n_key_value_heads or model.cfg.n_heads)


def _n_nodes(model: Any, node: str) -> int:
    if node not in ("z", "q", "k", "v"):
        raise InputError(f"node must be 'z', 'q', 'k' or 'v', not {node!r}")
    return int(model.cfg.n_heads) if node in ("z", "q") else _n_kv(model)


def _taps(model: Any, store: dict[int, Any], layers: Iterable[int]) -> contextlib.ExitStack:
    """Record each layer's ``AttentionInputs`` (rotated q, k, the additive mask) in ``store``."""
    stack = contextlib.ExitStack()
    for layer in layers:
        def tap(inp: Any, layer: int = layer) -> None:
            store[layer] = inp
        stack.enter_context(model.attention.tap(layer, tap))
    return stack


def _warn_side_inputs(model: Any, what: str) -> None:
    """Vision features injected past the decoder input (Qwen3-VL's DeepStack) are not on the
    interpolation path nor an EAP sender."""
    if model.family.vision_side_inputs:
        warnings.warn(f"{what}: this model injects vision features after the decoder input "
                      "(DeepStack); they stay the target's, so the interpolation path does not "
                      "end at the source run and no edge carries them (docs/causal.md)",
                      stacklevel=3)


def _make_leaf(x: Tensor, hook: Any) -> Tensor:
    """Start the graph at the decoder input: nothing needs gradients through the vision tower
    and embeddings, and keeping their activations for the backward would cost memory."""
    return x.detach().requires_grad_(True)


def _backward(
    model: Any, batch: MultimodalBatch, metric: Metric, names: Sequence[str], *, copies: int = 1,
    edits: Sequence[tuple[str, Callable]] = (), taps: dict[int, Any] | None = None,
    features: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward of ``copies`` stacked copies of ``batch`` (``edits`` may treat copies
    differently; the copies reuse the batch's image features) and one backward of ``sum over
    copies of mean over examples of metric``. Returns the activations and gradients at
    ``names`` ([copies * batch, ...], detached). ``features``: a dict shared by the calls of one
    loop, so the image features are computed once for all of them."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> Tensor:
            acts[name] = x
            return x
        return hook

    store = {} if features is None else features
    if copies > 1 and "image" not in store:
        store["image"] = image_features(model, batch)
    big, extra = stacked(model, batch, copies, store.get("image") if copies > 1 else None)
    hooks = [("blocks.0.hook_resid_pre", _make_leaf), *edits, *[(n, keep(n)) for n in names]]
    with torch.enable_grad(), (_taps(model, taps, range(model.cfg.n_layers))
                               if taps is not None else contextlib.nullcontext()):
        logits = model.run_with_hooks(big, fwd_hooks=hooks, **extra)
        value = metric(logits, big).float().view(copies, len(batch)).mean(1).sum()
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    return ({n: acts[n].detach() for n in names},
            {n: (g if g is not None else torch.zeros_like(acts[n])).detach()
             for n, g in zip(names, grads)})


def _grad_drop_edits(model: Any, drops: Sequence[int | None], B: int) -> list[tuple[str, Callable]]:
    """Copy i of a stacked batch gets no gradient through layer ``drops[i]``'s residual
    contributions (attention and MLP outputs); its forward is unchanged."""
    edits = []
    for layer in sorted({d for d in drops if d is not None}):
        rows = [i for i, d in enumerate(drops) if d == layer]

        def drop(x: Tensor, hook: Any, rows: list[int] = rows) -> Tensor:
            x = x.clone()
            for i in rows:
                x[i * B:(i + 1) * B] = x[i * B:(i + 1) * B].detach()
            return x
        edits += [(act_name("attn_out", layer), drop), (act_name("mlp_out", layer), drop)]
    return edits


def _interpolate(src_emb: Tensor, alphas: Sequence[float], B: int) -> tuple[str, Callable]:
    """An edit of the decoder input of stacked copies: copy i gets x_s + alpha_i (x - x_s),
    on the straight line from the source's input embeddings (0) to the run's own (1)."""
    a = torch.tensor(list(alphas))

    def hook(x: Tensor, hook: Any) -> Tensor:
        s = src_emb.to(x.device, x.dtype).repeat(len(a), 1, 1)
        w = a.to(x.device, x.dtype).repeat_interleave(B)[:, None, None]
        return s + w * (x - s)
    return ("blocks.0.hook_resid_pre", hook)


def _patterns(inp: Any, B: int, q: Tensor | None = None, k: Tensor | None = None,
              heads: Sequence[int] | None = None) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Exact softmax pattern (fp32) of the first ``B`` examples of one layer's tapped inputs,
    optionally with other (rotated) queries or keys, for the query heads ``heads`` only (one
    KV group at most; default: every head)."""
    q = (inp.q[:B] if q is None else q).detach()
    k = (inp.k[:B] if k is None else k).detach()
    mask = inp.mask
    if mask is not None:
        mask = (mask[:B] if mask.shape[0] > 1 else mask).detach().float()
    if heads is not None:
        rep = q.shape[1] // k.shape[1]
        groups = sorted({h // rep for h in heads})
        if len(groups) != 1:
            raise ValueError(f"heads {list(heads)} span KV groups {groups}")
        q, k = q[:, list(heads)], k[:, groups]
        if mask is not None and mask.shape[1] > 1:
            mask = mask[:, list(heads)]
    a = AttentionInputs(inp.layer, q.float(), k.float(), inp.v, mask, inp.scaling)
    tq = q.shape[2]
    return torch.softmax(a.scores_rows(torch.arange(tq, device=q.device).expand(B, tq)), dim=-1)


# --- node attribution: AtP and AtP* --------------------------------------------------------
def attribute_heads(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, node: Node = "z", qk_fix: bool = False, grad_drop: bool = False,
    ig_steps: int | None = None, copies_per_forward: int = 8, per_position: bool = False,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer head pos"]:
    """Attribution patching of every head (``node="z"``, ``"q"``: ``[layer, head]``) or KV head
    (``"k"``, ``"v"``: ``[layer, kv_head]``) in one backward pass.

    ``per_position=True`` keeps the sequence axis (``[layer, head, pos]``, positions of the
    padded target batch, summed over examples as the batch-mean metric weighs them): the
    estimate of patching the node at one position only; summed over ``pos`` it is the default
    result. Plain AtP and ``ig_steps`` only (the QK fix and GradDrop are per node).

    Plain AtP (the default) estimates ``patch_heads(..., node=node) - baseline`` and is exact
    where the metric is linear in the node. ``qk_fix=True`` recomputes the attention pattern
    exactly for q / k nodes (AtP*'s QK fix; z / v nodes are unchanged by it).
    ``grad_drop=True`` adds GradDrop: L gradients (each with one layer dropped) from
    ``copies_per_forward`` stacked copies per backward, combined as the mean over examples of
    ``sum_l |c_l(example)| / (L - 1)`` (Kramar et al.'s eq. 11) — a magnitude, for ranking.
    ``atp_star`` sets both.
    ``ig_steps=m`` integrates the gradient instead (as EAP-IG does for edges): the mean of the
    gradients of m runs whose decoder input embeddings lie on the straight line from the
    source's to the target's (k / m, k = 1..m), dotted with the same endpoint difference —
    for effects that only appear once the patch is large enough (a flat start, where the
    gradient at the target alone sees nothing; ``docs/causal.md``).
    """
    check_aligned(source, target)
    L, B = model.cfg.n_layers, len(target)
    n_out = _n_nodes(model, node)
    names = [act_name(node, l) for l in range(L)]
    fixed = qk_fix and node in ("q", "k")
    if fixed:
        names = [act_name("pattern", l) for l in range(L)]
    drops: list[int | None] = list(range(L)) if grad_drop else [None]
    if per_position and (qk_fix or grad_drop):
        raise InputError("per_position works with plain AtP and ig_steps, not with qk_fix or "
                         "grad_drop (they score whole nodes)")
    if grad_drop and L < 2:
        raise InputError("GradDrop needs at least two layers (it averages over L - 1)")
    if ig_steps is not None:
        if qk_fix or grad_drop:
            raise InputError("ig_steps integrates plain AtP; it does not combine with qk_fix "
                             "or grad_drop")
        if int(ig_steps) < 1:
            raise InputError("ig_steps must be >= 1")
        return _integrated(model, source, target, metric, names, int(ig_steps),
                           copies_per_forward, per_position)

    # the patched quantity of every node: a_source - a_target, or pattern_patched - pattern
    if fixed:
        src_in: dict[int, Any] = {}
        with torch.no_grad(), _taps(model, src_in, range(L)):
            model(source)
    else:
        src = cache_activations(model, source, names)
    # per drop, example, layer, node: the example's term (the batch mean's 1/B inside)
    T = target.inputs["input_ids"].shape[1]
    estimates = torch.zeros(len(drops), B, L, n_out, *((T,) if per_position else ()))
    chunk = max(1, int(copies_per_forward))
    features: dict[str, Any] = {}
    for start in range(0, len(drops), chunk):
        part = drops[start:start + chunk]
        taps: dict[int, Any] | None = {} if fixed else None
        acts, grads = _backward(model, target, metric, names, copies=len(part),
                                edits=_grad_drop_edits(model, part, B), taps=taps,
                                features=features)
        for l, name in enumerate(names):
            g = grads[name].float().view(len(part), B, *grads[name].shape[1:])
            if fixed:
                inp = taps[l]  # copy 0 of the stacked run: every copy's forward is the same
                rep = inp.q.shape[1] // inp.k.shape[1]
                for i in range(n_out):  # only the heads the node feeds are recomputed
                    if node == "q":
                        q = inp.q[:B].clone()
                        q[:, i] = src_in[l].q[:, i]
                        heads = [i]
                        patched = _patterns(inp, B, q=q, heads=heads)
                    else:
                        k = inp.k[:B].clone()
                        k[:, i] = src_in[l].k[:, i]
                        heads = list(range(i * rep, (i + 1) * rep))
                        patched = _patterns(inp, B, k=k, heads=heads)
                    delta = patched - _patterns(inp, B, heads=heads)
                    estimates[start:start + len(part), :, l, i] = torch.einsum(
                        "cbhqk,bhqk->cb", g[:, :, heads], delta).cpu()
            else:
                diff = (src[name] - acts[name][:B]).float()
                estimates[start:start + len(part), :, l] = torch.einsum(
                    "cbthd,bthd->cbht" if per_position else "cbthd,bthd->cbh", g, diff).cpu()
    if not grad_drop:
        return estimates[0].sum(0)
    # Kramar et al. eq. 11: mean over examples of sum_l |c_l(example)| / (L - 1)
    return estimates.abs().sum(dim=(0, 1)) / (L - 1)


def _integrated(model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
                names: list[str], m: int, per_forward: int, per_position: bool = False) -> Tensor:
    _warn_side_inputs(model, "ig_steps")
    B, emb = len(target), "blocks.0.hook_resid_pre"
    src = cache_activations(model, source, [emb, *names])
    tgt = cache_activations(model, target, names)
    alphas = [k / m for k in range(1, m + 1)]
    T = target.inputs["input_ids"].shape[1]
    total = torch.zeros(len(names), _n_nodes(model, names[0].rsplit("_", 1)[1]),
                        *((T,) if per_position else ()))
    per_forward = max(1, int(per_forward))
    features: dict[str, Any] = {}
    for start in range(0, m, per_forward):
        part = alphas[start:start + per_forward]
        _, grads = _backward(model, target, metric, names, copies=len(part),
                             edits=[_interpolate(src[emb], part, B)], features=features)
        for l, name in enumerate(names):
            g = grads[name].float().view(len(part), B, *grads[name].shape[1:])
            total[l] += torch.einsum("cbthd,bthd->ht" if per_position else "cbthd,bthd->h", g,
                                     (src[name] - tgt[name]).float()).cpu()
    return total / m


def atp_star(
    model: Any, source: MultimodalBatch, target: MultimodalBatch, metric: Metric,
    *, node: Node = "z", grad_drop: bool = True, copies_per_forward: int = 8,
) -> Float[Tensor, "layer head"]:
    """AtP* (Kramar et al. 2024): AtP with the QK fix and, by default, GradDrop (then the
    result is a non-negative magnitude; ``grad_drop=False`` keeps the signed QK-fixed
    estimate)."""
    return attribute_heads(model, source, target, metric, node=node, qk_fix=True,
                           grad_drop=grad_drop, copies_per_forward=copies_per_forward)


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
        d = json.loads(Path(path).read_text())
        scores = torch.tensor([[math.nan if v is None else v for v in row]
                               for row in d["scores"]], dtype=torch.float32)
        return cls(d["senders"], d["receivers"], scores, d["method"], d.get("meta", {}))


def _blocks(model: Any) -> list[Any]:
    return list(model.bridge.blocks)


def _check_eap_supported(model: Any) -> None:
    if model.family.sandwich_norms:
        raise InputError(f"edge attribution needs per-head residual contributions; the "
                         f"{model.family.name} family normalises the attention and MLP outputs "
                         "before the residual add (sandwich norms), so heads do not add up")


def _weight(linear: Any, n: int, name: str) -> Float[Tensor, "n d_head d_model"]:
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
    block = _blocks(model)[layer]
    ln1 = getattr(block.ln1, "original_component", block.ln1)
    ln2 = getattr(block.ln2, "original_component", block.ln2)
    x = acts[act_name("resid_pre", layer)]
    labels, parts = [], []
    for kind in ("q", "k", "v"):
        g = grads[act_name(kind, layer)].float()  # [N, t, n, d_head]
        n = g.shape[2]
        w = _weight(getattr(block.attn, kind), n, f"W_{kind.upper()}")
        u = torch.einsum("Ntnk,nkd->nNtd", g, w.to(g.device))
        parts.append(_pull_back(ln1, x, u))
        name = head_name if kind == "q" else kv_head_name
        labels += [f"{name((layer, i))}.{kind}" for i in range(n)]
    g = grads[f"blocks.{layer}.mlp.hook_in"].float()
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
    _check_eap_supported(model)
    if method not in ("eap", "eap-ig"):
        raise InputError(f"method must be 'eap' or 'eap-ig', not {method!r}")
    m = 1 if method == "eap" else int(steps)
    if m < 1:
        raise InputError("EAP-IG needs steps >= 1")
    _warn_side_inputs(model, method)
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(target)
    emb = "blocks.0.hook_resid_pre"
    z_names = [act_name("z", l) for l in range(L)]
    mlp_names = [act_name("mlp_out", l) for l in range(L)]
    src = cache_activations(model, source, [emb, *z_names, *mlp_names])
    tgt = cache_activations(model, target, [emb, *z_names, *mlp_names])
    names = [emb] + [f"blocks.{l}.{n}" for l in range(L)
                     for n in ("hook_resid_pre", "hook_resid_mid", "attn.hook_q", "attn.hook_k",
                               "attn.hook_v", "mlp.hook_in")]
    names = list(dict.fromkeys(names + ["ln_final.hook_in"]))

    senders = ["embed"] + [head_name((l, h)) for l in range(L) for h in range(H)] + [
        f"MLP{l}" for l in range(L)]
    deltas = {"embed": (src[emb] - tgt[emb]).float()}
    for l in range(L):
        deltas[z_names[l]] = (src[z_names[l]] - tgt[z_names[l]]).float()
        deltas[mlp_names[l]] = (src[mlp_names[l]] - tgt[mlp_names[l]]).float()
    w_o = []
    for l in range(L):
        w = _weight(_blocks(model)[l].attn.o, 1, "W_O")[0]  # [d_model, H * d_head]
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
        edits = [_interpolate(src[emb], part, B)] if m > 1 else []
        acts, grads = _backward(model, target, metric, names, copies=c, edits=edits,
                                features=features)
        labels, blocks = [], []
        for l in range(L + 1):
            if l < L:
                lab, g = _receiver_grads(model, l, acts, grads)
            else:
                lab, g = ["logits"], grads["ln_final.hook_in"].float().unsqueeze(0)
            labels += lab
            blocks.append(contract(g.view(g.shape[0], c, B, *g.shape[2:]).sum(1), l))
            del g
        part_scores = torch.cat(blocks, dim=1)
        scores = part_scores if scores is None else scores + part_scores
        del acts, grads
    assert scores is not None
    scores = (scores / m).detach()  # the metric's 1/B is already inside the gradients

    r_layer = [L if r == "logits" else int(r[3:]) if r.startswith("MLP")
               else parse_head(r.split(".")[0])[0] for r in labels]
    r_mlp = torch.tensor([r.startswith("MLP") for r in labels])
    r_layer_t = torch.tensor(r_layer)
    for l in range(L):  # no edge unless the receiver reads the sender's output
        heads_ok = (r_layer_t > l) | ((r_layer_t == l) & r_mlp)
        scores[1 + l * H:1 + (l + 1) * H, ~heads_ok] = math.nan
        scores[1 + L * H + l, ~(r_layer_t > l)] = math.nan
    return EdgeScores(senders, labels, scores, method,
                      {"steps": m, "n_examples": B, "n_layers": L, "n_heads": H,
                       "n_kv_heads": _n_kv(model)})
