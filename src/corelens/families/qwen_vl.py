"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: HF ``Qwen2VL``-, ``Qwen2_5_VL``- and
``Qwen3VLForConditionalGeneration``.

Geometry (all three): the processor resizes each image with ``smart_resize`` to multiples of
``patch_size * merge_size`` (within ``min_pixels``/``max_pixels``, aspect kept as closely as
possible), cuts ``patch_size`` patches and the vision tower's merger folds each
``merge_size x merge_size`` block of patches into one LM token. ``image_grid_thw[i] = (1, h, w)`` in
patches; the LM token grid is ``(h / merge, w / merge)``, row-major: the processor orders patches
by merge block (row-major over blocks), Qwen2.5-VL's window reordering is undone right after the
merger (``merger(...)[argsort(window_index)]``), Qwen3-VL has none. A token's box is its
``merge * patch`` square of the resized image, scaled back to original pixels per axis.

Videos (``pixel_values_videos``, ``video_grid_thw[v] = (t, h, w)``): every frame is resized
like an image (the video processor's own ``smart_resize``; Qwen3-VL's counts the pixels of all
frames), the frame count is padded to a multiple of ``temporal_patch_size`` (2) by repeating the
last frame, and each patch spans 2 consecutive frames: one LM token per merge block per
temporal slot, slot-major, row-major inside a slot (the same order as an image). So a video
token sees frames ``[2t, 2t + 2)`` (the last slot of an odd-length video sees only its last
frame, twice). Qwen2-VL and Qwen2.5-VL write all of a video's tokens in one run between
``<|vision_start|>``/``<|vision_end|>``; Qwen2.5-VL's M-RoPE temporal id of slot t is
``t * second_per_grid_ts * tokens_per_second`` (``second_per_grid_ts = 2 / sampled fps``, from
the video metadata corelens passes); Qwen3-VL writes each slot as ``<t seconds>`` text (the
mean time of its two frames), ``<|vision_start|>``, the slot's tokens, ``<|vision_end|>``, and
gives each slot its own M-RoPE block (the text between slots is ordinary text, not V_e). In
transformers 5.23 its processor replaces only the ``<|video_pad|>`` of the chat template's
``<|vision_start|><|video_pad|><|vision_end|>``, so those outer delimiters stay around the whole
run (``<|vision_start|><t><|vision_start|>...<|vision_end|>...<|vision_end|>``); corelens lays
out whatever the processor wrote (the slots are found by token id) and gets the position ids
from HF, so parity holds either way. The
layout reads the frame grid off ``video_grid_thw`` and the position ids come from the model's
own ``get_rope_index``.

Positions: M-RoPE. ``position_ids`` are ``[3, batch, seq]`` (temporal, height, width): the ids of
the model's own ``get_rope_index`` with the batch's ``attention_mask`` -- exactly what the HF
forward computes when it is given none (a 3-row tensor takes the same path in the text model;
padding positions are 0). A left-padded batch of images only gets the same ids from
``image_rope_ids`` (numpy, once per kind of example: text counts on, an image takes ``start +
(frame, row, col)`` of its LM grid, the text after it starts at ``start + max(h, w)``), without
HF's torch loop per example; ``tests/test_prepare_equivalence.py`` checks them against
``get_rope_index`` on every Qwen family. Batches with videos go to ``get_rope_index``.

In transformers 5.23 all three families mix the three rows into one
``cos``/``sin`` of shape ``[batch, seq, head_dim]`` inside the text rotary embedding (Qwen2-VL and
Qwen2.5-VL: contiguous ``mrope_section`` chunks; Qwen3-VL: interleaved T/H/W channels), and the
attention applies the standard ``apply_rotary_pos_emb`` -- which ``rotary()`` calls, from the
family's own HF module. ``blocks.{l}.attn.hook_rot_q``/``hook_rot_k`` therefore see M-RoPE-rotated
queries/keys. Qwen3-VL's per-head ``q_norm``/``k_norm`` (RMSNorm over ``head_dim`` on ``[b, t,
heads, d]``, before RoPE) is applied by corelens's attention as HF does.

DeepStack (Qwen3-VL only): vision blocks listed in ``deepstack_visual_indexes`` feed extra patch
mergers; the HF text model ADDS their outputs to the hidden states at the image-token positions
right after decoder layers ``0 .. k-1`` -- a tensor add in HF's layer loop, between two block
calls, not a module. What the TransformerLens hooks see (checked in ``tests/test_qwen_vl.py``):

- ``vision_encoder.deepstack_mergers.{i}.hook_out``: exactly the features injected after decoder
  layer i, ``[n_vision_tokens_in_batch, d_model]``: one row per image-token position, in
  ``layout.vision_mask()`` order (examples in order, positions ascending). Editing it edits the
  injection (zeroing it removes DeepStack level i); this is the hook to patch the injection.
- ``blocks.{i}.hook_resid_post`` (= ``blocks.{i}.hook_out``): the block output WITHOUT it.
- ``blocks.{i+1}.hook_resid_pre`` (= ``blocks.{i+1}.hook_in``): WITH it. So for ``i < k``
  ``resid_pre[i+1] - resid_post[i]`` is zero at text positions and the level-i features at vision
  positions (if ``k`` equals the number of layers, the last level reaches ``ln_final.hook_in``).
- ``blocks.0.hook_resid_pre``: the merged main features only (the vision projector's output).

Patching caveat: the TransformerLens identity ``resid_post[i] == resid_pre[i+1]`` fails at vision
positions for ``i < k``. Patching ``blocks.{i}.hook_resid_post`` leaves the receiving run's own
injection on top; patch ``blocks.{i+1}.hook_resid_pre`` (and/or the merger hook) to carry it.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from corelens import compat
from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.errors import InputError
from corelens.families.base import Family
from corelens.families.geometry import Affine


def check_resize(family: str, image: int, size: tuple[int, int], resized: tuple[int, int],
                 factor: int, thw: tuple[int, int, int]) -> None:
    """Check that ``resized = (w, h)``, read off ``image_grid_thw``, is one of the resizes
    ``smart_resize`` makes of ``size``, whatever ``min_pixels`` / ``max_pixels`` were: each side
    rounded to a multiple of ``factor`` (no scaling), or scaled by one common ``s < 1`` and
    floored (at least ``factor``), or by one ``s > 1`` and ceiled; one frame."""
    (w, h), (rw, rh) = size, resized

    def scales(side: int, got: int, mode: str) -> tuple[float, float]:
        if mode == "floor":  # got = max(factor, floor(side * s / factor) * factor)
            return (0.0 if got == factor else got / side, (got + factor) / side)
        return ((got - factor) / side, got / side)  # ceil: got = ceil(side * s / factor) * factor

    rounded = (rw, rh) == tuple(max(factor, round(x / factor) * factor) for x in (w, h))
    scaled = False
    for mode, (lo, hi) in (("floor", (0.0, 1.0)), ("ceil", (1.0, float("inf")))):
        (a0, a1), (b0, b1) = scales(w, rw, mode), scales(h, rh, mode)
        scaled |= max(a0, b0, lo) <= min(a1, b1, hi)
    if thw[0] != 1 or not (rounded or scaled):
        raise ValueError(
            f"{family}: image {image} (original {w}x{h}) has image_grid_thw {thw}, i.e. a "
            f"{rw}x{rh} resize, which is not an aspect-preserving resize to multiples of "
            f"{factor} px; the images and the processor outputs do not match")


class QwenVL(Family):
    """What the Qwen-VL families share: geometry and M-RoPE position ids."""

    modeling: ClassVar[str]  # the HF modeling module (its ``apply_rotary_pos_emb``)
    resolution_settings = ("min_pixels", "max_pixels", "size")

    # --- layout ------------------------------------------------------------------------------
    def feature_rows(self, hf_config, processor, inputs, image, size):
        ip = processor.image_processor
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        vc = hf_config.vision_config
        if (patch, merge) != (vc.patch_size, vc.spatial_merge_size):
            raise ValueError(
                f"{self.name}: the image processor cuts {patch}-px patches merged {merge}x{merge} "
                f"but the model expects {vc.patch_size}-px patches merged "
                f"{vc.spatial_merge_size}x{vc.spatial_merge_size}"
            )
        # the resize the processor made, read off its output (never re-predicted from settings:
        # min_pixels / max_pixels / size may be set in several ways HF honours)
        t, gh, gw = (int(v) for v in inputs["image_grid_thw"][image].tolist())
        rw, rh = gw * patch, gh * patch
        check_resize(self.name, image, size, (rw, rh), patch * merge, (t, gh, gw))
        scale, offset = Affine.identity(size).resize((rw, rh)).inverse()
        cell = patch * merge
        view = ViewGeometry.from_affine("image", gh // merge, gw // merge, (cell, cell), scale,
                                        offset, size)
        return FeatureRows.grid(view)

    def layout_keys(self, inputs, sizes):
        grids = inputs["image_grid_thw"].tolist()
        return [(size, tuple(grids[i])) for i, size in enumerate(sizes)]

    flat_tower = True

    def tower_grids(self, hf_config, processor, inputs, image, size):
        patch = int(processor.image_processor.patch_size)
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][image].tolist())
        scale, offset = Affine.identity(size).resize((gw * patch, gh * patch)).inverse()
        return [ViewGeometry.from_affine("image", gh, gw, (patch, patch), scale, offset, size)]

    def tower_merge(self, hf_config):
        return int(hf_config.vision_config.spatial_merge_size)

    supports_video = True

    def video_feature_rows(self, hf_config, processor, inputs, video, size, n_frames, times):
        vp = processor.video_processor
        patch, merge, tp = int(vp.patch_size), int(vp.merge_size), int(vp.temporal_patch_size)
        vc = hf_config.vision_config
        if (patch, merge, tp) != (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size):
            raise ValueError(
                f"{self.name}: the video processor cuts {patch}-px patches of {tp} frames merged "
                f"{merge}x{merge} but the model expects {vc.patch_size}-px patches of "
                f"{vc.temporal_patch_size} frames merged {vc.spatial_merge_size}x"
                f"{vc.spatial_merge_size}")
        t, gh, gw = (int(v) for v in inputs["video_grid_thw"][video].tolist())
        if t != -(-n_frames // tp):
            raise ValueError(f"{self.name}: video {video} has {n_frames} frames but "
                             f"video_grid_thw {(t, gh, gw)}: expected {-(-n_frames // tp)} "
                             f"temporal slots of {tp} frames")
        rw, rh = gw * patch, gh * patch  # the frame size after the processor's resize
        scale, offset = Affine.identity(size).resize((rw, rh)).inverse()
        cell = patch * merge
        grid = ViewGeometry.from_affine("frame", gh // merge, gw // merge, (cell, cell), scale,
                                        offset, size)
        views = []
        for k in range(t):
            a, b = k * tp, min((k + 1) * tp, n_frames)
            views.append(grid.at_frames(f"f{a}" if b == a + 1 else f"f{a}-{b - 1}", (a, b),
                                        times))
        return FeatureRows.concat([FeatureRows.grid(v) for v in views])

    # --- decoder -----------------------------------------------------------------------------
    def position_ids(self, hf_model, inputs):
        """``[3, batch, seq]`` M-RoPE ids: those of the model's own ``get_rope_index``. A
        left-padded batch of images only gets them from ``image_rope_ids`` (the same ids,
        without HF's torch loop per example); other batches (videos) from HF, whole."""
        cfg = hf_model.config
        ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:  # what the processor returns: 0 text, 1 image, 2 video
            types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
        mask = inputs.get("attention_mask")
        grid = inputs.get("image_grid_thw")
        if inputs.get("video_grid_thw") is None and grid is not None:
            pos = image_rope_ids(types, mask, grid, int(cfg.vision_config.spatial_merge_size))
            if pos is not None:
                return pos.to(ids.dtype)
        pos, _ = hf_model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=grid,
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=mask)
        return pos

    def rotary(self) -> Callable[..., tuple[Tensor, Tensor]]:
        apply_rope = importlib.import_module(self.modeling).apply_rotary_pos_emb

        def apply(q: Float[Tensor, "b h t d"], k: Float[Tensor, "b g t d"], cos: Tensor,
                  sin: Tensor, hf_attn: Any) -> tuple[Tensor, Tensor]:
            return apply_rope(q, k, cos, sin)  # cos/sin: [b, t, d], M-RoPE already mixed in

        return apply


class Qwen2_VL(QwenVL):
    """Qwen2-VL: Qwen2.5-VL's geometry and M-RoPE (contiguous ``mrope_section`` chunks) with a
    plain ViT (no windows, LayerNorm, non-gated MLP). TransformerLens lacks its adapter: corelens
    adds one (``families/adapters.py``)."""

    name = "qwen2_vl"
    hf_architectures = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)
    modeling = "transformers.models.qwen2_vl.modeling_qwen2_vl"

    def bridge_architecture(self, hf_config: Any) -> str:
        return "Qwen2VLForConditionalGeneration"  # corelens's adapter (families/adapters.py)


class Qwen2_5_VL(QwenVL):
    name = "qwen2_5_vl"
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    modeling = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
    # tower hooks that see the patches in the processor's order; every later one sees them in
    # window order (HF undoes it only after the merger)
    # (the rotary embedding is computed from the position ids before the reorder, too)
    tower_hooks_in_processor_order = ("vision_encoder.hook_in", "vision_encoder.hook_vision_embed",
                                      "vision_encoder.patch_embed.",
                                      "vision_encoder.pos_embed.hook_out")

    def tower_block_order(self, hf_model, inputs, hook_name):
        if hook_name.startswith(self.tower_hooks_in_processor_order):
            return None
        return compat.qwen2_5_vl_window_index(hf_model.config.vision_config,
                                              inputs["image_grid_thw"])


class Qwen3_VL(QwenVL):
    name = "qwen3_vl"
    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    modeling = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    vision_side_inputs = True  # DeepStack: features added at the vision positions after layers

    @contextlib.contextmanager
    def prune_side_inputs(self, decoder: Any, kept: Callable[[], Tensor | None],
                          n_tokens: Callable[[], int]) -> Iterator[None]:
        """DeepStack adds features at the vision positions after early layers: after a pruning
        layer, only at the kept ones (the features follow the visual mask's order)."""
        deepstack = compat.qwen3_vl_deepstack(decoder)
        if deepstack is None:
            yield
            return

        def deepstack_kept(hidden: Tensor, masks: Tensor, embeds: Tensor) -> Tensor:
            keep = kept()
            if keep is not None and hidden.shape[1] != masks.shape[1] == n_tokens():
                masks = masks.to(keep.device)
                flags = torch.zeros_like(masks).scatter_(1, keep, True)
                embeds = embeds[flags[masks].to(embeds.device)]
                masks = masks.gather(1, keep)
            return deepstack(hidden, masks, embeds)

        with compat.replace_qwen3_vl_deepstack(decoder, deepstack_kept):
            yield

    def check_videos(self, lengths: list[int]) -> None:
        if any(n < 2 for n in lengths):
            raise InputError(f"{self.name}: its video processor needs at least 2 frames per video "
                             f"(one temporal patch), got frame counts {lengths}; repeat the "
                             "frame or pass it as an image")


def image_rope_ids(types: Tensor, mask: Tensor | None, grid: Tensor, merge: int
                   ) -> Tensor | None:
    """What HF's ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike, for images)
    returns for a batch of images only, in numpy; None when the batch is not what this expects
    (padding only on the left, token types 0 / 1, one ``image_grid_thw`` row per run of image
    tokens, each run as long as its grid): HF computes those. Padding gets 0. Examples alike in
    token types, padding and image grids get alike ids, computed once."""
    kinds_t = types.cpu().numpy()
    mask_np = None if mask is None else mask.cpu().numpy()
    real = np.ones(kinds_t.shape, bool) if mask_np is None else mask_np != 0
    if not len(kinds_t) or not (real[:, 1:] >= real[:, :-1]).all():
        return None  # real tokens not one block per row: runs would join across the padding
    if not ((kinds_t == 0) | (kinds_t == 1))[real].all():
        return None
    image = (kinds_t == 1) & real
    starts = image.copy()
    starts[:, 1:] &= ~image[:, :-1]
    runs = starts.sum(1)
    ends = runs.cumsum()
    grids = grid.cpu().numpy()
    if ends[-1] != len(grids):
        return None
    out = np.zeros((3, *kinds_t.shape), np.int64)
    done: dict[tuple[bytes, ...], int] = {}  # kind -> the example that has its ids
    for e, (b, g) in enumerate(zip((ends - runs).tolist(), ends.tolist())):
        key = (kinds_t[e].tobytes(), b"" if mask_np is None else mask_np[e].tobytes(),
               grids[b:g].tobytes())
        if key in done:
            out[:, e] = out[:, done[key]]
            continue
        ids = _rope_ids_of_example(kinds_t[e][real[e]], grids[b:g], merge)
        if ids is None:
            return None
        out[:, e, real[e]] = ids
        done[key] = e
    return torch.from_numpy(out)


def _rope_ids_of_example(types: np.ndarray, grids: np.ndarray, merge: int) -> np.ndarray | None:
    """``[3, n]`` ids of one example's real tokens, as ``get_rope_index`` counts them: a run of
    text tokens counts on from the position before it, the same on all three rows; an image of
    LM grid ``(t, h, w)`` (``image_grid_thw`` with h, w divided by ``merge``) takes
    ``start + (frame, row, col)`` in row-major order, and the text after it starts at
    ``start + max(h, w)``. None when a run of image tokens is not as long as its grid."""
    n = len(types)
    if n == 0:
        return None
    cuts = (np.flatnonzero(np.diff(types)) + 1).tolist()
    out = np.empty((3, n), np.int64)
    pos, image = 0, 0
    for a, b in zip([0] + cuts, cuts + [n]):
        if types[a] == 0:
            out[:, a:b] = np.arange(pos, pos + b - a)
            pos += b - a
            continue
        t, h, w = (int(v) for v in grids[image])
        h, w = h // merge, w // merge
        image += 1
        if t * h * w != b - a:
            return None
        out[0, a:b] = pos + np.arange(t).repeat(h * w)
        out[1, a:b] = pos + np.tile(np.arange(h).repeat(w), t)
        out[2, a:b] = pos + np.tile(np.arange(w), t * h)
        pos += max(h, w)
    return out
