"""circuitsvis views over a HookedMLLM run: attention heads / patterns and colored tokens.

Every view is an ``HTMLView`` whose HTML embeds circuitsvis's local bundle (never a CDN).
Long multimodal sequences: pick the query rows (``query_positions``: ``None`` = every
position, ``"query"`` = the answer-predicting positions, ``"last"``, or positions) and collapse
vision tokens (``collapse="row"``: one token per image row; ``"region"``: evidence /
distractors / other; ``"auto"``: rows when the sequence is longer than ``max_tokens``).
A collapsed key sums the attention over its tokens; a collapsed query row is the mean of its
members' rows that were asked for. Rows not asked for are all zero.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.heads import head_name
from corelens.hook_names import act_name
from corelens.views.html import HTMLView, component
from corelens.views.tokens import (
    Collapse,
    TokenGroup,
    group_matrix,
    resolve_queries,
    token_groups,
)

Queries = str | Tensor | Sequence[int] | None


def pattern_name(layer: int) -> str:
    return act_name("pattern", layer)


@torch.no_grad()
def query_patterns(
    model: Any, batch: MultimodalBatch, layers: Sequence[int], example: int = 0,
    queries: Tensor | None = None, cache: Any = None,
) -> dict[int, Float[Tensor, "head q key"]]:
    """Attention rows of ``example`` at ``queries`` (every position when None), per layer.

    One forward for all layers; with queries only their rows are kept (no [T, T] cache).
    ``cache``: an ``ActivationCache`` of full patterns from ``run_with_cache`` to reuse.
    """
    names = [pattern_name(layer) for layer in layers]
    T = batch.seq_len
    if cache is not None and all(n in cache for n in names):
        out = {}
        for layer, n in zip(layers, names):
            pat = cache[n][example].float().cpu()
            if pat.shape[-2] != T:
                raise InputError(f"{n} in the given cache has {pat.shape[-2]} query rows, not "
                                 f"the full {T}: pass a cache made without positions=")
            out[layer] = pat if queries is None else pat[:, queries]
        return out
    _, got = model.run_with_cache(batch, names_filter=names, positions=queries,
                                  logits_to_keep=1)
    return {layer: got[n][example].float().cpu() for layer, n in zip(layers, names)}


def collapse_pattern(
    rows: Float[Tensor, "head q key"], queries: Tensor | None, groups: list[TokenGroup],
    seq_len: int,
) -> Float[Tensor, "head g g"]:
    """Square [head, group, group] pattern: keys summed per group, query rows averaged."""
    member = group_matrix(groups, seq_len)  # [g, T]
    keys = rows @ member.T  # [head, q, g]
    q = torch.arange(seq_len) if queries is None else queries
    qmember = member[:, q]  # [g, q]
    count = qmember.sum(1, keepdim=True)
    weights = torch.where(count > 0, qmember / count.clamp(min=1), qmember)
    return torch.einsum("gq,hqk->hgk", weights, keys)


def _prepare(model: Any, batch: MultimodalBatch, layer: int, heads: Sequence[int] | None,
             example: int, query_positions: Queries, collapse: Collapse | str,
             max_tokens: int, cache: Any, max_cells: int
             ) -> tuple[Tensor, list[str], list[int], Collapse, Tensor | None]:
    if not 0 <= example < len(batch):
        raise InputError(f"example {example} out of range (batch has {len(batch)})")
    n_heads = model.cfg.n_heads
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    if any(not 0 <= h < n_heads for h in heads):
        raise InputError(f"heads {heads} out of range: the model has {n_heads} heads per layer")
    if collapse == "auto":
        n_valid = int(batch.attention_mask[example].sum())
        collapse = "row" if n_valid > max_tokens else None
    queries = resolve_queries(batch, example, query_positions)
    groups = token_groups(model, batch, example, collapse)  # type: ignore[arg-type]
    if len(heads) * len(groups) ** 2 > max_cells:
        raise InputError(
            f"{len(heads)} heads x {len(groups)}^2 tokens is too large for a circuitsvis view "
            f"(max_cells={max_cells}): pass collapse='row' or 'region', fewer heads, or raise "
            "max_cells")
    rows = query_patterns(model, batch, [layer], example, queries, cache)[layer][heads]
    att = collapse_pattern(rows, queries, groups, batch.seq_len)
    return att, [g.label for g in groups], heads, collapse, queries  # type: ignore[return-value]


def _caption(batch: MultimodalBatch, example: int, queries: Tensor | None,
             collapse: Collapse | str, n_tokens: int) -> str:
    q = "every position" if queries is None else f"query positions {queries.tolist()}"
    c = f", vision tokens collapsed per {collapse}" if collapse else ""
    return f"example {example}: rows = {q}{c}; {n_tokens} tokens shown"


def attention_heads(
    model: Any, batch: MultimodalBatch, layer: int, heads: Sequence[int] | None = None,
    example: int = 0, query_positions: Queries = None, collapse: Collapse | str = None,
    *, max_tokens: int = 256, cache: Any = None, decimals: int = 4, max_cells: int = 4_000_000,
    max_value: float | None = None,
) -> HTMLView:
    """circuitsvis ``AttentionHeads`` for ``heads`` (all by default) of ``layer``; the colour
    scale tops out at ``max_value`` (default: the largest value shown)."""
    att, labels, heads, collapse, queries = _prepare(model, batch, layer, heads, example,
                                                   query_positions, collapse, max_tokens, cache,
                                              max_cells)
    top = float(att.max()) if max_value is None and att.numel() else max_value
    props = {"attention": att.round(decimals=decimals).tolist(), "tokens": labels,
             "attentionHeadNames": [head_name((layer, h)) for h in heads],
             "maskUpperTri": collapse is None, "maxValue": top, "minValue": 0.0}
    return HTMLView(component("AttentionHeads", props), title=f"Layer {layer} attention heads",
                    caption=_caption(batch, example, queries, collapse, len(labels)),
                    uses_circuitsvis=True,
                    data={"attention": att, "tokens": labels, "heads": heads, "layer": layer})


def attention_patterns(
    model: Any, batch: MultimodalBatch, layer: int, heads: Sequence[int] | None = None,
    example: int = 0, query_positions: Queries = None, collapse: Collapse | str = None,
    *, max_tokens: int = 256, cache: Any = None, decimals: int = 4, max_cells: int = 4_000_000,
) -> HTMLView:
    """circuitsvis ``AttentionPatterns`` (one pattern, head selector, token hover)."""
    att, labels, heads, collapse, queries = _prepare(model, batch, layer, heads, example,
                                              query_positions, collapse, max_tokens, cache,
                                              max_cells)
    props = {"attention": att.round(decimals=decimals).tolist(), "tokens": labels}
    names = ", ".join(head_name((layer, h)) for h in heads)
    return HTMLView(component("AttentionPatterns", props),
                    title=f"Layer {layer} attention patterns ({names})",
                    caption=_caption(batch, example, queries, collapse, len(labels)),
                    uses_circuitsvis=True,
                    data={"attention": att, "tokens": labels, "heads": heads, "layer": layer})


Reduce = str | int | Callable[[Tensor], Tensor]


def reduce_activation(act: Tensor, reduce: Reduce) -> Float[Tensor, " seq"]:
    """[seq, ...] -> [seq]: ``"norm"`` (L2), ``"mean"``, ``"sum"``, ``"max"``, an int (that
    feature of the last axis), or a callable."""
    if act.ndim == 1:
        return act.float()
    if callable(reduce):
        return torch.as_tensor(reduce(act)).float().flatten()
    if isinstance(reduce, int):
        return act[..., reduce].reshape(act.shape[0], -1).float().mean(-1)
    flat = act.reshape(act.shape[0], -1).float()
    ops: dict[str, Callable[[Tensor], Tensor]] = {
        "norm": lambda x: x.norm(dim=-1), "mean": lambda x: x.mean(-1),
        "sum": lambda x: x.sum(-1), "max": lambda x: x.max(-1).values}
    if reduce not in ops:
        raise InputError(f"reduce must be one of {sorted(ops)}, an int or a callable, "
                         f"not {reduce!r}")
    return ops[reduce](flat)


@torch.no_grad()
def token_values(model: Any, batch: MultimodalBatch, hook_name: str, head: int | None = None,
                 example: int = 0, reduce: Reduce = "norm",
                 cache: Any = None) -> Float[Tensor, " seq"]:
    """One value per sequence position of ``example`` from any decoder hook point."""
    if hook_name.endswith(("hook_pattern", "hook_attn_scores")):
        raise InputError(f"{hook_name} is an attention pattern: use views.attention_heads")
    if hook_name not in model.hook_dict:
        raise InputError(f"no hook point {hook_name!r} on this model (see model.hook_dict)")
    if cache is None or hook_name not in cache:
        _, cache = model.run_with_cache(batch, names_filter=hook_name, logits_to_keep=1)
    act = cache[hook_name]
    if act.ndim < 2 or act.shape[0] != len(batch) or act.shape[1] != batch.seq_len:
        raise InputError(f"{hook_name} has shape {tuple(act.shape)}, not [batch, seq, ...]: "
                         "only decoder hook points have one value per token")
    act = act[example].detach().cpu()
    if head is not None:
        if act.ndim < 3:
            raise InputError(f"{hook_name} has no head axis (shape {tuple(act.shape)}): "
                             "pass head=None")
        act = act[:, head]
    return reduce_activation(act, reduce)


def colored_tokens(
    model: Any, batch: MultimodalBatch, hook_name: str, head: int | None = None,
    example: int = 0, reduce: Reduce = "norm", collapse: Collapse | str = None,
    *, max_tokens: int = 256, cache: Any = None, values: Tensor | None = None,
) -> HTMLView:
    """circuitsvis ``ColoredTokens``: one value per token from ``hook_name`` (and ``head``),
    reduced over the feature axes by ``reduce``; a collapsed group shows its members' mean.
    ``values`` ([seq]) skips the run and shows those values instead."""
    if values is None:
        values = token_values(model, batch, hook_name, head, example, reduce, cache)
    values = torch.as_tensor(values).float().cpu()
    if values.shape != (batch.seq_len,):
        raise InputError(f"values must have one entry per position ({batch.seq_len}), "
                         f"got shape {tuple(values.shape)}")
    if collapse == "auto":
        collapse = "row" if int(batch.attention_mask[example].sum()) > max_tokens else None
    groups = token_groups(model, batch, example, collapse)  # type: ignore[arg-type]
    member = group_matrix(groups, batch.seq_len)
    shown = (member @ values.nan_to_num()) / member.sum(1)
    what = hook_name + (f" head {head}" if head is not None else "")
    props = {"tokens": [g.label for g in groups], "values": shown.tolist()}
    how = getattr(reduce, "__name__", reduce)
    return HTMLView(component("ColoredTokens", props), title=f"{what} ({how})",
                    caption=f"example {example}; {len(groups)} tokens shown"
                    + (f", vision tokens collapsed per {collapse} (mean)" if collapse else ""),
                    uses_circuitsvis=True,
                    data={"values": shown, "tokens": props["tokens"], "hook": hook_name})
