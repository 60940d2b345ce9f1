"""The streaming-head plan of one batch: which keys a streaming head sees (sinks, text,
pooled vision summaries, image blocks), shared by every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from corelens.data.batch import MultimodalBatch


@dataclass
class StreamPlan:
    """What streaming heads see for one batch (shared by every layer)."""

    valid: Bool[Tensor, "batch seq"]
    vision: Bool[Tensor, "batch seq"]
    glob: Bool[Tensor, "batch seq"]  # sinks + text
    glob_idx: Int[Tensor, "batch g"]  # sinks + text, padded
    glob_ok: Bool[Tensor, "batch g"]
    pool_w: Tensor  # [batch, p, seq] mean weights
    pool_last: Int[Tensor, "batch p"]
    pool_ok: Bool[Tensor, "batch p"]
    pool_bias: Tensor  # [batch, p] log(chunk size)
    block: Int[Tensor, "batch seq"] | None = None  # image block id (-1: none); None: causal
    _block_mask: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]


def image_blocks(vision: Bool[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """HF's ``block_sequence_ids`` (Gemma 3): each run of consecutive image tokens is one block
    (0, 1, ... per example), -1 elsewhere."""
    start = vision & ~F.pad(vision, (1, 0))[:, :-1]
    return torch.where(vision, start.long().cumsum(-1) - 1, -1)


def plan_streaming(vision: Tensor, valid: Tensor, n_sink: int, n_pooled: int,
          bidirectional: bool = False) -> StreamPlan:
    vision, valid = vision.bool() & valid.bool(), valid.bool()
    b, t = valid.shape
    rank = valid.long().cumsum(-1) - 1
    glob = valid & (~vision | (rank < n_sink))
    n_glob = int(glob.sum(-1).max()) if b else 0
    glob_idx = torch.zeros(b, n_glob, dtype=torch.long)
    glob_ok = torch.zeros(b, n_glob, dtype=torch.bool)
    pool_w = torch.zeros(b, n_pooled, t)
    pool_last = torch.zeros(b, n_pooled, dtype=torch.long)
    pool_ok = torch.zeros(b, n_pooled, dtype=torch.bool)
    pool_bias = torch.zeros(b, n_pooled)
    for e in range(b):
        p = glob[e].nonzero()[:, 0].cpu()
        glob_idx[e, :len(p)], glob_ok[e, :len(p)] = p, True
        if n_pooled:
            vp = (vision[e] & ~glob[e]).nonzero()[:, 0].cpu()
            for c, chunk in enumerate(torch.tensor_split(vp, n_pooled)):
                if len(chunk):
                    pool_w[e, c, chunk] = 1.0 / len(chunk)
                    pool_last[e, c], pool_ok[e, c] = chunk[-1], True
                    pool_bias[e, c] = math.log(len(chunk))
    dev = valid.device
    return StreamPlan(valid, vision, glob, glob_idx.to(dev), glob_ok.to(dev), pool_w.to(dev),
                 pool_last.to(dev), pool_ok.to(dev), pool_bias.to(dev),
                 image_blocks(vision) if bidirectional else None)


def layout_masks(batch: MultimodalBatch, device: torch.device) -> tuple[Tensor, Tensor]:
    vision = batch.layout.vision_mask().to(device)
    valid = batch.attention_mask.to(device).bool()
    return vision, valid
