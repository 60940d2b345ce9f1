"""SAE features on the image: activation overlays, per-token attribution, top-activating patches.

- ``feature_activations``: a feature's activation (``<hook>.hook_sae_acts_post``, the SAE spliced
  with its error term) at each vision token, per example in ``layout.vision_positions(e)`` order.
- ``feature_overlay``: those values painted on the ORIGINAL image through the layout boxes,
  every view of the image (``overlay.token_overlay``: per pixel, the coverage-weighted mean of
  the tokens over it within a view, the view of largest magnitude across views); a list of
  features gives a grid, one tile each.
- ``feature_attribution``: activation x gradient of a metric (default: the answer's
  log-prob at the query positions, ``patching.answer_logprob``) with respect to the feature's
  activation at each vision token -- the first-order change of the metric when that token's
  activation is removed, so scaling every token's activation by ``1 + eps`` changes the
  metric by ``eps x`` their sum, to first order. The SAE is spliced with its error term: the
  forward is the model's own, the gradient flows through ``hook_sae_acts_post`` and the decoder.
- ``top_patches`` / ``feature_patches_html``: over a dataset of grounded examples, each
  feature's top-activating vision tokens (``saes.store.batch_activations`` with the ``vision``
  role, encoded by the SAE), shown as crops of the original image around the token's box with
  the activation value, on a self-contained HTML page (PNGs as data URIs).

SAEs at decoder hook points only (one row per sequence position): a vision-tower SAE's rows are
tower patches, not the vision tokens these views paint, and is refused (train and inspect it
through ``saes.store`` with ``model.tower_layout``).
"""

from __future__ import annotations

import html as _html
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from PIL import Image, ImageDraw
from torch import Tensor

from corelens.data.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.hook_names import EMBED, is_vision_hook
from corelens.interventions.core import Metric
from corelens.interventions.patching import answer_logprob
from corelens.saes.attach import saes as spliced
from corelens.saes.sae import SAE
from corelens.saes.store import batch_activations, check_hook
from corelens.views.html import HTMLView, image_html, page
from corelens.views.overlay import Combine, _source_image, grid, token_overlay

Features = int | Sequence[int]
PATCH_COLOR = (0, 200, 255)


def _acts_name(sae: SAE) -> str:
    return f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"


def _features(sae: SAE, features: Features) -> list[int]:
    feats = [int(features)] if isinstance(features, int) else [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < sae.cfg.d_sae]
    if bad or not feats:
        raise InputError(f"features {bad or feats} out of range: the SAE has d_sae="
                         f"{sae.cfg.d_sae} features (0 ... {sae.cfg.d_sae - 1})")
    return feats


def _check(model: Any, sae: SAE) -> None:
    name = sae.cfg.metadata.hook_name
    if not name:
        raise InputError("this SAE names no hook point: set sae.cfg.metadata.hook_name")
    check_hook(name, model)
    if is_vision_hook(name):
        raise InputError(f"{name} is a vision-tower hook: these views paint the decoder's vision "
                         "tokens; use an SAE trained at a decoder hook (its tower rows are laid "
                         "out by model.tower_layout(batch, hook) for the activation store)")


def _per_vision_token(batch: MultimodalBatch, rows: Tensor, one: bool) -> list[Tensor]:
    """``rows [batch, seq, k]`` -> per example ``[v_e]`` (one feature) / ``[v_e, k]``."""
    out = []
    for e in range(len(batch)):
        r = rows[e, batch.layout.vision_positions(e).to(rows.device)].float().cpu()
        out.append(r[:, 0] if one else r)
    return out


class _Stop(Exception):
    """Raised once the feature activations are read: the rest of the forward is not needed."""


@torch.no_grad()
def feature_activations(model: Any, batch: MultimodalBatch, sae: SAE,
                        features: Features) -> list[Float[Tensor, "v ..."]]:
    """Per example e, the activations of ``features`` at its vision tokens, aligned with
    ``batch.layout.vision_positions(e)``: ``[v_e]`` for one feature, ``[v_e, k]`` for a list.

    Read at ``<hook_name>.hook_sae_acts_post`` with the SAE spliced in (error term on); the
    forward stops there."""
    _check(model, sae)
    feats = _features(sae, features)
    got: dict[str, Tensor] = {}

    def grab(acts: Tensor, hook: Any) -> None:
        got["rows"] = acts[..., feats].detach()
        raise _Stop

    try:
        with spliced(model, [sae], use_error_term=True), \
                model.hooks(fwd_hooks=[(_acts_name(sae), grab)]):
            model(batch, return_type=None)
    except _Stop:
        pass
    if "rows" not in got:
        raise InputError(f"{_acts_name(sae)} did not fire in the forward")
    return _per_vision_token(batch, got["rows"], isinstance(features, int))


def feature_overlay(
    model: Any, batch: MultimodalBatch, sae: SAE, feature: Features, example: int = 0,
    image: int = 0, *, combine: Combine = "max", video: int | None = None,
    values: Sequence[Tensor] | None = None, cols: int = 4, cell: int = 224, **paint_kw: Any,
) -> Image.Image:
    """Feature ``feature``'s activation at each vision token of ``image`` (every view) painted
    on the original image (``token_overlay``: evidence and distractor boxes drawn; ``video=v``
    paints the frames of video v; ``paint_kw`` go to ``paint``: ``vmax``, ``scale``,
    ``image_obj`` ...). ``values``: ``feature_activations``' output, to reuse a forward.

    A list of features: a grid (``cols`` per row, ``cell`` px tiles) titled with each feature
    and its largest activation on the image, on one colour scale unless ``vmax`` is given."""
    acts = values if values is not None else feature_activations(model, batch, sae, feature)
    mine = acts[example]
    if isinstance(feature, int):
        return token_overlay(batch, mine, example, image, combine=combine, video=video,
                             **paint_kw)
    feats = _features(sae, feature)
    if mine.ndim != 2 or mine.shape[1] != len(feats):
        raise InputError(f"values hold {tuple(mine.shape)} per example; {len(feats)} features "
                         "need [vision tokens, features] (feature_activations of that list)")
    paint_kw.setdefault("vmax", float(mine.max()) if mine.numel() else 1.0)
    tiles = [token_overlay(batch, mine[:, i], example, image, combine=combine, video=video,
                           **paint_kw) for i in range(len(feats))]
    titles = [f"feature {f}  max {float(mine[:, i].max()):.3g}" for i, f in enumerate(feats)]
    return grid(tiles, titles, cols=cols, cell=cell)


def feature_attribution(model: Any, batch: MultimodalBatch, sae: SAE, feature: Features,
                        metric: Metric | None = None) -> list[Float[Tensor, "v ..."]]:
    """Per example e, activation x gradient of ``metric(logits, batch)[e]`` (default:
    ``answer_logprob``, the answer's log-prob at the query positions) with respect to the
    feature's activation at each of its vision tokens, aligned with
    ``batch.layout.vision_positions(e)`` (``[v_e]``; ``[v_e, k]`` for a list of features).

    The SAE is spliced with its error term, so the forward is the model's own; the gradient
    reaches ``<hook_name>.hook_sae_acts_post`` through the SAE's decoder. One forward and one
    backward for every example and feature (examples do not interact in a batch)."""
    _check(model, sae)
    feats = _features(sae, feature)
    metric = metric or answer_logprob
    got: dict[str, Tensor] = {}

    def leaf(acts: Tensor, hook: Any) -> Tensor:
        got["acts"] = acts.detach().requires_grad_(True)
        return got["acts"]

    def cut(x: Tensor, hook: Any) -> Tensor:  # no graph through the vision tower / embeddings
        return x.detach()

    hooks: list[tuple[str, Any]] = [(_acts_name(sae), leaf)]
    name = sae.cfg.metadata.hook_name
    if name.startswith("blocks.") and model.hook_dict[EMBED] is not model.hook_dict[name]:
        hooks.insert(0, (EMBED, cut))  # only downstream of the decoder input
    with torch.enable_grad(), spliced(model, [sae], use_error_term=True):
        logits = model.run_with_hooks(batch, fwd_hooks=hooks)
        if "acts" not in got:
            raise InputError(f"{_acts_name(sae)} did not fire in the forward")
        value = metric(logits, batch).float().sum()
        (grad,) = torch.autograd.grad(value, [got["acts"]], allow_unused=True)
    acts = got["acts"].detach()
    grad = torch.zeros_like(acts) if grad is None else grad
    return _per_vision_token(batch, (acts * grad)[..., feats], isinstance(feature, int))


# --- top-activating patches -------------------------------------------------------------------
@dataclass
class Patch:
    """One of a feature's top-activating vision tokens over a dataset."""

    feature: int
    rank: int  # 0 = the largest activation
    activation: float
    example: int  # index into the examples
    example_id: Any
    position: int  # in the padded batch the store built (``batch_size`` examples at a time)
    label: str  # the token label, ``<img 0:r2,c3>``
    box: tuple[float, float, float, float]  # original pixels
    source: Image.Image  # the image (or the frame) the token sees

    def crop(self, context: float = 1.0, cell: int = 96) -> Image.Image:
        """The image around the token's box (``context`` box sizes on each side, clipped),
        the longer side scaled to ``cell`` px, the box outlined."""
        x0, y0, x1, y1 = self.box
        w, h = self.source.size
        dx, dy = context * (x1 - x0), context * (y1 - y0)
        cx0, cy0 = max(0, math.floor(x0 - dx)), max(0, math.floor(y0 - dy))
        cx1, cy1 = min(w, math.ceil(x1 + dx)), min(h, math.ceil(y1 + dy))
        img = self.source.convert("RGB").crop((cx0, cy0, max(cx1, cx0 + 1), max(cy1, cy0 + 1)))
        k = cell / max(img.size)
        img = img.resize((max(1, round(img.size[0] * k)), max(1, round(img.size[1] * k))),
                         Image.Resampling.NEAREST if k >= 1 else Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(img)
        draw.rectangle([(x0 - cx0) * k, (y0 - cy0) * k, (x1 - cx0) * k - 1, (y1 - cy0) * k - 1],
                       outline=PATCH_COLOR, width=max(1, round(cell / 48)))
        return img


def _encode_rows(sae: SAE, rows: Tensor, feats: list[int]) -> Tensor:
    """Feature activations of store rows ``[n, d_in]`` (a ``hook_z`` SAE flattens its
    ``[..., head, d_head]`` input: the rows, already flat, go in as one head of width d_in)."""
    x = rows.to(sae.device)
    if sae.cfg.reshape_activations == "hook_z":
        x = x.unsqueeze(-2)
    return sae.encode(x)[..., feats].float().cpu()


def _source(batch: MultimodalBatch, e: int, info: Any) -> Image.Image:
    if info.modality != "video":
        return _source_image(batch, e, info.image, None)
    frame = batch.videos[e][info.image].frames[(info.frames or (0, 1))[0]]
    return frame if isinstance(frame, Image.Image) else Image.fromarray(frame)


@torch.no_grad()
def top_patches(model: Any, examples: Sequence[Any], sae: SAE, features: Sequence[int],
                top: int = 8, *, batch_size: int = 8,
                **prepare_kw: Any) -> tuple[dict[int, list[Patch]], dict[str, Any]]:
    """Each feature's ``top`` largest activations over every vision token of ``examples``
    (only tokens where it is active, > 0), largest first, ties in dataset order; and the
    statistics of the scan (``tokens``, ``examples``, ``active`` per feature, ``max``).

    Streams ``batch_size`` examples at a time through ``saes.store.batch_activations`` (the
    ``vision`` role: activations at the SAE's hook, with example / position metadata), encodes
    them with the SAE and keeps a running top list, so memory does not grow with the dataset."""
    _check(model, sae)
    feats = _features(sae, list(features))
    if top < 1:
        raise InputError("top must be >= 1")
    best: dict[int, list[tuple[float, int, Patch]]] = {f: [] for f in feats}
    active = dict.fromkeys(feats, 0)
    n_tokens, order = 0, 0
    for start in range(0, len(examples), batch_size):
        batch = model.prepare_examples(list(examples[start:start + batch_size]), **prepare_kw)
        rows = batch_activations(model, batch, sae.cfg.metadata.hook_name, ("vision",), start)
        vals = _encode_rows(sae, rows.acts, feats)  # [n, k]
        n_tokens += len(rows)
        for i, f in enumerate(feats):
            col = vals[:, i]
            active[f] += int((col > 0).sum())
            idx = torch.sort(col, descending=True, stable=True).indices[:top]
            for j in idx.tolist():
                v = float(col[j])
                if v <= 0:
                    break
                ex, pos = int(rows.example[j]), int(rows.position[j])
                info = batch.layout.token_info(ex - start, pos)
                patch = Patch(f, -1, v, ex, rows.ids[j], pos, info.label(),
                              tuple(info.box), _source(batch, ex - start, info))
                best[f].append((-v, order + j, patch))
            best[f] = sorted(best[f], key=lambda t: (t[0], t[1]))[:top]
        order += len(rows)
    out = {f: [replace(p, rank=r) for r, (_, _, p) in enumerate(best[f])] for f in feats}
    stats = {"tokens": n_tokens, "examples": len(examples), "active": active,
             "max": {f: (out[f][0].activation if out[f] else 0.0) for f in feats}}
    return out, stats


def feature_patches_html(
    model: Any, examples: Sequence[Any], sae: SAE, features: Sequence[int], top: int = 8, *,
    batch_size: int = 8, context: float = 1.0, cell: int = 96, title: str = "SAE features",
    path: str | Path | None = None, **prepare_kw: Any,
) -> str:
    """A self-contained HTML page (images inlined as PNG data URIs): per feature, its ``top``
    top-activating image patches over ``examples`` (``top_patches``), largest first, each a
    crop of the original image around the token's box (``context`` box sizes around it,
    ``cell`` px) captioned with its activation, the example and the token label.

    Each patch is a ``<figure class="corelens-patch">`` with ``data-feature``, ``data-rank``,
    ``data-activation`` (the exact float), ``data-example`` and ``data-position``. ``path``:
    also write the page there."""
    found, stats = top_patches(model, examples, sae, features, top, batch_size=batch_size,
                               **prepare_kw)
    items = []
    for f, patches in found.items():
        figs = []
        for p in patches:
            name = _html.escape(str(p.example_id if p.example_id is not None else p.example))
            figs.append(
                f'<figure class="corelens-patch" data-feature="{f}" data-rank="{p.rank}" '
                f'data-activation="{p.activation!r}" data-example="{p.example}" '
                f'data-position="{p.position}" style="margin:0;text-align:center;'
                f'font-size:12px;width:{max(cell, 120)}px;overflow-wrap:anywhere;">'
                f'{image_html(p.crop(context, cell), alt=p.label)}'
                f'<figcaption><b>{p.activation:.4g}</b><br>{name}<br>'
                f'{_html.escape(p.label)}</figcaption></figure>')
        body = ('<div style="display:flex;flex-wrap:wrap;gap:10px;">' + "".join(figs) + "</div>"
                if figs else "<p>no vision token activates this feature</p>")
        caption = (f"top {len(patches)} of {stats['tokens']} vision tokens in "
                   f"{stats['examples']} examples; active on {stats['active'][f]}, max "
                   f"{stats['max'][f]:.4g}; {sae.cfg.metadata.hook_name}")
        items.append(HTMLView(body, title=f"feature {f}", caption=caption))
    text = page(items, title=title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text
