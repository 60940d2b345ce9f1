"""First-principles attention masks for the hybrid-attention tests.

Written from docs/accel.md ("What each head sees") and from what HF's attention does, WITHOUT
``corelens.accel``'s planning code (``_plan``, ``HybridAttention.allowed``, ``splits``), which the
hybrid kernel itself uses: a bug there cannot cancel out between the kernel and the reference
it is compared against.

- the model's own mask: row ``i`` sees key ``j`` iff ``j`` is not padding and ``j <= i`` or
  (Gemma 3) ``i`` and ``j`` are image-feature tokens of the same image; on a sliding-window
  layer also ``j > i - sliding_window`` (HF: ``AND(sliding, OR(causal, block))``);
- a streaming head sees, of those, the keys that are a sink (one of the first ``n_sink``
  non-padding tokens), in the window ``|i - j| <= window``, or text (not an image-feature token
  of the batch's ``VisionLayout``);
- a full head (a CoRe head; under GQA not its group-mates, which stream over the group's full
  cache) sees the model's own mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def text_config(model):
    cfg = model.hf_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def layer_windows(model) -> list[int | None]:
    """Each decoder layer's sliding window from the HF config (``layer_types``), None for a
    full-attention layer."""
    tc = text_config(model)
    types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    return [tc.sliding_window if kind == "sliding_attention" else None for kind in types]


def bidirectional_images(model) -> bool:
    """Gemma 3: HF's own mask lets the tokens of one image attend to each other both ways."""
    return model.family.name == "gemma3"


def image_positions(batch) -> list[list[Tensor]]:
    """Per example, per image: the positions of its image-feature tokens."""
    return [[img.vision_positions for img in ex] for ex in batch.layout.images]


def extended_valid(batch, seq_len: int | None = None) -> Tensor:
    """The batch's non-padding mask, extended to ``seq_len`` with (generated) valid tokens."""
    valid = batch.attention_mask.bool()
    t = seq_len or valid.shape[1]
    extra = torch.ones(len(valid), t - valid.shape[1], dtype=torch.bool)
    return torch.cat([valid, extra], 1)


def model_mask(valid: Tensor, images: list[list[Tensor]], bidirectional: bool = False,
               sliding: int | None = None) -> Tensor:
    """The model's own attention mask, bool [batch, seq, seq] (row i = query, column j = key)."""
    b, t = valid.shape
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    block = torch.full((b, t), -1)  # which image a token belongs to (-1: none)
    for e, ex in enumerate(images):
        for n, pos in enumerate(ex):
            block[e, pos] = n
    ok = (j <= i)[None].expand(b, t, t)
    if bidirectional:
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        ok = ok | same
    if sliding is not None:
        ok = ok & (j > i - sliding)[None]
    return ok & valid[:, None, :]


def streaming_keys(valid: Tensor, images: list[list[Tensor]], n_sink: int,
                   window: int) -> Tensor:
    """bool [batch, seq, seq]: key j is a sink, inside the window of row i, or a text token
    (before intersecting with the model's own mask)."""
    b, t = valid.shape
    sink = torch.zeros(b, t, dtype=torch.bool)
    text = torch.ones(b, t, dtype=torch.bool)
    for e in range(b):
        sink[e, valid[e].nonzero()[:n_sink, 0]] = True  # the first n_sink non-padding tokens
        for pos in images[e]:
            text[e, pos] = False
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    band = ((i - j).abs() <= window)[None]
    return band | sink[:, None, :] | text[:, None, :]


def full_query_heads(heads, n_layers: int) -> list[set[int]]:
    """Per layer, the query heads that attend fully: the CoRe heads themselves. (Under GQA
    their group-mates stream, reading the group's full cache: the keys a head sees do not
    depend on which cache holds them.)"""
    full = [set() for _ in range(n_layers)]
    for layer, head in heads:
        full[layer].add(head)
    return full


def hybrid_reference(model, batch, heads, n_sink: int, window: int,
                     seq_len: int | None = None) -> list[Tensor]:
    """Per layer, the bool [batch, head, seq, seq] mask of what each head of the hybrid sees
    (own mask for full heads; own mask AND (sink | window | text) for streaming heads), for the
    batch extended with text tokens to ``seq_len``."""
    n_heads = text_config(model).num_attention_heads
    valid = extended_valid(batch, seq_len)
    images = image_positions(batch)
    windows = layer_windows(model)
    full = full_query_heads(heads, len(windows))
    stream = streaming_keys(valid, images, n_sink, window)
    out = []
    for layer, sw in enumerate(windows):
        own = model_mask(valid, images, bidirectional_images(model), sw)
        m = (own & stream)[:, None].repeat(1, n_heads, 1, 1)
        for h in full[layer]:
            m[:, h] = own
        out.append(m)
    return out


def own_masks(model, batch, seq_len: int | None = None) -> list[Tensor]:
    """Per layer, the model's own mask [batch, seq, seq] for the batch (extended to
    ``seq_len``)."""
    valid = extended_valid(batch, seq_len)
    images = image_positions(batch)
    return [model_mask(valid, images, bidirectional_images(model), sw)
            for sw in layer_windows(model)]
