"""matplotlib figures: the head-score heatmap, ablation curves and patching heatmaps.

Every function returns a ``matplotlib.figure.Figure``; ``views.save_png(fig, path)`` writes it,
``views.figure_html(fig)`` embeds it as ``<img src="data:image/png;base64,...">``.

Ablation-curve input (``AblationCurve.to_dict(metric)`` produces it; JSON-able)::

    {"fracs": [0.02, 0.05, ...],   # fraction of all heads ablated (x axis), required
     "top": [...],                 # metric with the top-k heads ablated, required
     "none": 0.91,                 # unablated value (horizontal line), optional
     "random_mean": [...], "random_lo": [...], "random_hi": [...],   # optional band
     "random_seeds": [[...], ...], # optional, per frac: one value per seed (band if no lo/hi)
     "bottom": [...],              # optional
     "metric": "accuracy", "ks": [...], "method": "zero", "score_metric": "ram"}  # optional

Lists align with ``fracs``; a missing optional key is simply not drawn. A list of such dicts
draws one panel each; an ``AblationCurve`` object or its saved JSON (metric -> dict) works too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.errors import InputError
from corelens.scores.head_scores import HeadScores


def _new(figsize: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    """A pyplot-free Figure (no global state, no GUI backend) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def head_heatmap(scores: HeadScores | Tensor, title: str | None = None,
                 top_frac: float = 0.05) -> Any:
    """Layers x heads heatmap of a ``HeadScores`` (e.g. RAM); the top ``top_frac`` outlined."""
    if not isinstance(scores, HeadScores):
        t = torch.as_tensor(scores, dtype=torch.float32)
        if t.ndim != 2:
            raise InputError(f"head scores must be [layers, heads], got {tuple(t.shape)}")
        scores = HeadScores(t, "score")
    L, H = scores.n_layers, scores.n_heads
    fig, (ax,) = _new((min(2 + 0.45 * H, 16), min(1.5 + 0.35 * L, 14)))
    im = ax.imshow(scores.scores.float().numpy(), aspect="auto", cmap="viridis")
    from matplotlib.patches import Rectangle

    for layer, head in scores.top(frac=top_frac):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    n = f", {scores.n_examples} examples" if scores.n_examples else ""
    ax.set_title(title or f"{scores.metric}{n} (top {top_frac:.0%} outlined)")
    fig.colorbar(im, ax=ax)
    return fig


ram_heatmap = head_heatmap


def _curves(data: Any) -> list[dict[str, Any]]:
    if hasattr(data, "to_dict") and hasattr(data, "values") and not isinstance(data, Mapping):
        return [data.to_dict(m) for m in data.values]  # an AblationCurve
    if isinstance(data, Mapping):
        if "fracs" in data:
            return [dict(data)]
        if data and all(isinstance(v, Mapping) and "fracs" in v for v in data.values()):
            return [dict(v, metric=v.get("metric", k)) for k, v in data.items()]
    if isinstance(data, Sequence) and not isinstance(data, str):
        return [c for d in data for c in _curves(d)]
    raise InputError("ablation data must be a dict with 'fracs' and 'top' (see "
                     "corelens.views.plots), a list of them, or an AblationCurve")


def _band(curve: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    if curve.get("random_lo") is not None and curve.get("random_hi") is not None:
        return list(curve["random_lo"]), list(curve["random_hi"])
    seeds = curve.get("random_seeds")
    if seeds:
        return [min(s) for s in seeds], [max(s) for s in seeds]
    return None


def ablation_curves(data: Any, title: str | None = None) -> Any:
    """Metric vs fraction of heads ablated: top-k (red), random (mean and band), bottom-k
    (blue), unablated (dashed). ``data``: see the module docstring."""
    curves = _curves(data)
    fig, axes = _new((4.2 * len(curves), 3.4), ncols=len(curves))
    for ax, c in zip(axes, curves):
        if "fracs" not in c or "top" not in c:
            raise InputError(f"ablation curve needs 'fracs' and 'top', got keys {sorted(c)}")
        x = [100 * float(f) for f in c["fracs"]]
        for key in ("top", "bottom", "random_mean", "random_lo", "random_hi"):
            if c.get(key) is not None and len(c[key]) != len(x):
                raise InputError(f"'{key}' has {len(c[key])} values for {len(x)} fracs")
        if c.get("none") is not None:
            ax.axhline(float(c["none"]), color="gray", ls="--", lw=1, label="no ablation")
        band = _band(c)
        if band is not None:
            ax.fill_between(x, band[0], band[1], color="gray", alpha=0.25,
                            label="random (spread)")
        if c.get("random_mean") is not None:
            ax.plot(x, c["random_mean"], "o-", color="dimgray", label="random (mean)")
        ax.plot(x, c["top"], "o-", color="crimson",
                label=f"top by {c.get('score_metric') or 'score'}")
        if c.get("bottom") is not None:
            ax.plot(x, c["bottom"], "o-", color="royalblue", label="bottom")
        ax.set_xlabel("% of heads ablated" + (f" ({c['method']})" if c.get("method") else ""))
        ax.set_ylabel(c.get("metric", "metric"))
        ax.set_title(title or ("ablation: " + c["metric"] if c.get("metric") else "ablation"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def faithfulness_curves(curves: Sequence[Any], title: str | None = None) -> Any:
    """Faithfulness vs % of edges kept (log x), one line per method
    (``corelens.FaithfulnessCurve``s or their ``to_dict()``), CPR / CMD in the legend; the
    full model (1) dashed."""
    fig, (ax,) = _new((5.2, 3.6))
    for c in curves:
        d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
        if len(d["fractions"]) != len(d["faithfulness"]):
            raise InputError("a faithfulness curve needs one faithfulness per fraction")
        x = [100 * float(f) for f in d["fractions"]]
        ax.plot(x, d["faithfulness"], "o-", label=f"{d.get('method') or 'ranking'} (CPR "
                f"{d['cpr']:.3f}, CMD {d['cmd']:.3f})")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="full model")
    ax.set_xscale("log")
    ax.set_xlabel("% of edges kept (the rest ablated)")
    ax.set_ylabel("faithfulness")
    ax.set_title(title or "faithfulness curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def patching_heatmap(
    values: Float[Tensor, "layer col"] | Float[Tensor, "layer head group"],
    labels: Sequence[str] | None = None, title: str | None = None,
    kind: str = "head", metric: str = "effect",
) -> Any:
    """Patching results as a diverging heatmap centred on 0.

    ``values``: ``[layer, head]`` (``patch_heads``, ``attribute_heads``; ``kind="head"``),
    ``[layer, position group]`` (``patch_residual``; ``kind="position"``, ``labels`` = its
    group labels), or ``[layer, head, group]`` (``patch_heads_by_group``: one panel per group,
    ``labels`` = group labels)."""
    t = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if t.ndim == 2:
        panels = [(title or f"patching: {metric} by layer x {kind}", t)]
    elif t.ndim == 3:
        names = list(labels) if labels is not None else [str(g) for g in range(t.shape[2])]
        panels = [(f"{title + ': ' if title else ''}{n}", t[:, :, g]) for g, n in enumerate(names)]
        labels, kind = None, "head"
    else:
        raise InputError(f"patching values must be 2-D or 3-D, got {tuple(t.shape)}")
    L, C = panels[0][1].shape
    finite = t[torch.isfinite(t)]
    m = float(finite.abs().max()) if finite.numel() else 1.0
    m = m if m > 0 else 1.0
    width = min(2 + (0.45 if labels is None else 0.35) * C, 18)
    fig, axes = _new((width * len(panels) if len(panels) < 4 else 4.5 * len(panels),
                      min(1.8 + 0.35 * L, 14)), ncols=len(panels))
    for ax, (name, p) in zip(axes, panels):
        im = ax.imshow(p.numpy(), aspect="auto", cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_ylabel("layer")
        ax.set_yticks(range(L))
        if labels is not None:
            if len(labels) != C:
                raise InputError(f"{len(labels)} labels for {C} columns")
            ax.set_xticks(range(C))
            ax.set_xticklabels(list(labels), rotation=60, ha="right", fontsize=7)
            ax.set_xlabel(kind)
        else:
            ax.set_xticks(range(C))
            ax.set_xlabel(kind)
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=list(axes), label=metric)
    return fig


def is_blank(png: bytes, tol: int = 2) -> bool:
    """True when a PNG is a single flat colour (within ``tol``)."""
    import io

    from PIL import Image

    arr = Image.open(io.BytesIO(png)).convert("RGB")
    lo, hi = zip(*arr.getextrema())
    return max(h - lo_ for lo_, h in zip(lo, hi)) <= tol


__all__ = ["ablation_curves", "head_heatmap", "is_blank", "patching_heatmap", "ram_heatmap"]
