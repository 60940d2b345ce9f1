"""``HeadScores``: one score per (layer, query head), with what it means and where it came from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.heads import Head, head_name  # noqa: F401  (head_name: re-exported)


@dataclass
class HeadScores:
    """A [n_layers, n_heads] score tensor and its metadata.

    ``scores``: ``Float[Tensor, "layer head"]``. ``per_example``
    (``Float[Tensor, "example layer head"]``, optional) keeps the per-example values of
    mean-type scores so intervals come for free; NaN marks heads without a score (e.g. a ratio
    score under its mass floor). ``params`` records the definition's parameters. Heads are
    ``(layer, head)`` pairs: ``scores[h]`` is one head's value.

    Example:
        ```python
        from corelens import zoo
        from corelens.scores.ram import score_all

        model = zoo.load("toy-llava")
        ram = score_all(model, zoo.examples("toy-llava", 16, seed=0), progress=False)["ram"]
        ram.scores.shape, ram.per_example.shape  # ([4, 4], [16, 4, 4])
        ram.top(frac=0.05)  # the CoRe heads: ceil(0.05 * 16) = 1 head, e.g. [(0, 1)]
        ram.rank()[:3], ram[0, 2]  # heads by score; one head's score
        lo, hi = ram.bootstrap(n=200, seed=0)  # 95% intervals, Float[Tensor, "layer head"]
        ```
    """

    scores: Float[Tensor, "layer head"]
    metric: str
    model: str = ""
    dataset: str = ""
    n_examples: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    per_example: Float[Tensor, "example layer head"] | None = None

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    def rank(self) -> list[Head]:
        """All scored heads, best first (NaN scores last, excluded)."""
        flat = self.scores.flatten()
        valid = ~torch.isnan(flat)
        order = torch.argsort(torch.where(valid, flat, -math.inf), descending=True, stable=True)
        return [(int(i) // self.n_heads, int(i) % self.n_heads) for i in order if valid[i]]

    def top(self, frac: float | None = None, k: int | None = None) -> list[Head]:
        """The top ``k`` heads, or the top ``ceil(frac * L * H)`` (default frac = 0.05)."""
        if k is None:
            frac = 0.05 if frac is None else frac
            k = math.ceil(frac * self.n_layers * self.n_heads)
        return self.rank()[:k]

    def __getitem__(self, head: Head) -> float:
        return float(self.scores[head[0], head[1]])

    def bootstrap(self, n: int = 1000, alpha: float = 0.05,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
        """(low, high) percentile bootstrap interval of each head's mean over examples."""
        if self.per_example is None:
            raise ValueError(f"{self.metric}: no per-example values to bootstrap")
        g = torch.Generator().manual_seed(seed)
        x = self.per_example.double()
        idx = torch.randint(0, x.shape[0], (n, x.shape[0]), generator=g)
        means = x[idx].nanmean(dim=1)
        lo = torch.quantile(means, alpha / 2, dim=0).float()
        hi = torch.quantile(means, 1 - alpha / 2, dim=0).float()
        return lo, hi

    def compare(self, other: "HeadScores", k: int | None = None) -> dict[str, float]:
        """Spearman rank correlation over heads both score, and top-k overlap (k: 5% default)."""
        a, b = self.scores.flatten(), other.scores.flatten()
        valid = ~(torch.isnan(a) | torch.isnan(b))
        ra = _ranks(a[valid])
        rb = _ranks(b[valid])
        rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) if valid.sum() > 1 else math.nan
        k = k or len(self.top())
        overlap = len(set(self.top(k=k)) & set(other.top(k=k))) / max(k, 1)
        return {"spearman": rho, "top_k_overlap": overlap, "k": k}

    # --- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def tolist(t: Tensor) -> list:
            return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]

        d = {"metric": self.metric, "model": self.model, "dataset": self.dataset,
             "n_examples": self.n_examples, "params": self.params,
             "n_layers": self.n_layers, "n_heads": self.n_heads,
             "top_5pct": [head_name(h) for h in self.top()],
             "scores": tolist(self.scores)}
        if self.per_example is not None:
            d["per_example"] = [tolist(x) for x in self.per_example]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadScores":
        def tensor(rows: list) -> Tensor:
            return torch.tensor([[math.nan if v is None else v for v in r] for r in rows])

        per = d.get("per_example")
        return cls(tensor(d["scores"]), d["metric"], d.get("model", ""), d.get("dataset", ""),
                   d.get("n_examples", 0), d.get("params", {}),
                   torch.stack([tensor(x) for x in per]) if per else None)

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Layers x heads heatmap (matplotlib); the top-5% heads are outlined."""
        import matplotlib
        import matplotlib.pyplot as plt  # no backend forced: a notebook keeps its inline one

        if ax is None:
            _, ax = plt.subplots(figsize=(1 + 0.4 * self.n_heads, 1 + 0.3 * self.n_layers))
        im = ax.imshow(self.scores.numpy(), aspect="auto", cmap="viridis", origin="upper")
        for layer, head in self.top():
            ax.add_patch(matplotlib.patches.Rectangle((head - 0.5, layer - 0.5), 1, 1,
                                                      fill=False, ec="red", lw=1.5))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title or f"{self.metric} ({self.n_examples} examples)")
        ax.figure.colorbar(im, ax=ax)
        return ax


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.double)
    ranks[order] = torch.arange(len(x), dtype=torch.double)
    # average ties
    for v in torch.unique(x):
        sel = x == v
        if sel.sum() > 1:
            ranks[sel] = ranks[sel].mean()
    return ranks
