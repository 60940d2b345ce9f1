"""Which heads of one layer attend fully, and which KV heads each kind of query head reads.

Under GQA ``rep`` consecutive query heads share a KV head (a KV group). A query head attends
fully iff it is a CoRe head; a KV head keeps every token in the cache iff one of its query
heads attends fully (a *full group*). The other query heads of a full group are streaming
heads like any other: they see the streaming key set, read from the group's full keys.

The streaming heads' prefill is one SDPA call over every query head of the groups that have a
streaming head (KV read once per group, SDPA's ``enable_gqa``); the full heads' rows of that
call (a full head in a group with streaming heads) are computed and overwritten by the full
call. Gathering keys per query head instead costs more than those rows: the gathered-key slabs
are built once per KV head, not once per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass
class LayerSplit:
    """One layer's heads (index tensors, ascending)."""

    full_q: Int[Tensor, " n_full"]  # CoRe query heads: every key
    stream_q: Int[Tensor, " n_stream"]  # every other query head: the streaming key set
    full_kv: Int[Tensor, " n_full_kv"]  # KV heads with a full query head: cache keeps all
    stream_kv: Int[Tensor, " n_stream_kv"]  # the other KV heads: cache keeps the streaming set
    full_q_kv: Int[Tensor, " k"]  # the KV heads the full query heads read (see read_kv_heads)
    stream_groups: Int[Tensor, " g"]  # the KV heads with a streaming query head
    stream_group_q: Int[Tensor, " g_rep"]  # all query heads of those groups
    row_full: Bool[Tensor, "n_full_kv rep"]  # in each full group, which query heads are full

    @property
    def mixed(self) -> bool:
        """Whether a full group has streaming query heads."""
        return not bool(self.row_full.all())


def read_kv_heads(q_heads: list[int], rep: int) -> list[int]:
    """The KV heads that one SDPA call over query heads ``q_heads`` (ascending) reads: each
    KV head once when every KV head used serves the same number of them (SDPA's ``enable_gqa``
    pairs them in order: no copy per query head), else one per query head."""
    kv = [h // rep for h in q_heads]
    used = sorted(set(kv))
    if len({kv.count(g) for g in used}) == 1:
        return used
    return kv


def split_layer(full_heads: set[int], n_heads: int, n_kv: int) -> LayerSplit:
    """The split of one layer whose CoRe query heads are ``full_heads``."""
    rep = n_heads // n_kv
    full_q = sorted(full_heads)
    stream_q = [h for h in range(n_heads) if h not in full_heads]
    full_kv = sorted({h // rep for h in full_q})
    stream_kv = [g for g in range(n_kv) if g not in full_kv]
    row_full = torch.tensor([[g * rep + r in full_heads for r in range(rep)] for g in full_kv],
                            dtype=torch.bool).view(len(full_kv), rep)

    def lt(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.long)

    groups = sorted({h // rep for h in stream_q})
    return LayerSplit(lt(full_q), lt(stream_q), lt(full_kv), lt(stream_kv),
                      lt(read_kv_heads(full_q, rep)), lt(groups),
                      lt([g * rep + r for g in groups for r in range(rep)]), row_full)
