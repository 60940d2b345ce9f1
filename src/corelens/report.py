"""The whole study on one model and its grounded data, written as one offline HTML page.

score heads (RAM, selectivity) -> CoRe heads -> ablation curve (top vs random vs bottom) ->
activation patching of every head and path patching of the CoRe heads on clean/corrupted pairs
-> edges ranked by EAP-IG on half of the pairs, their faithfulness curve (vs a random
ranking) on the other half -> views (RAM heatmap, ablation curves, patching heatmap,
faithfulness curves, overlays of the CoRe heads, a circuitsvis view) -> ``OUT/report.html``
(self-contained) and ``OUT/summary.json``.
``corelens demo`` runs it on the shipped toy model; ``corelens report`` on any model + JSONL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from corelens import views
from corelens.accel import HybridAttention
from corelens.core.evaluate import evaluate, metric_value
from corelens.data.examples import check_disjoint, split_examples
from corelens.heads import head_name
from corelens.interventions.ablation import ablation_curve
from corelens.interventions.discovery import circuit_benchmark
from corelens.interventions.patching import patch_heads, path_patch, prepare_pair
from corelens.scores.ram import score_all
from corelens.zoo.scenes import recolor_target

Pairs = Callable[[Sequence[Any]], list[tuple[Any, Any]]]


def _record(examples: Sequence[Any], source: str) -> dict[str, Any]:
    return {"n": len(examples), "source": source,
            "ids": [getattr(ex, "id", None) for ex in examples]}


def run_study(
    model: Any,
    examples: Sequence[Any],
    out: str | Path,
    *,
    eval_examples: Sequence[Any] | None = None,
    pairs: Sequence[tuple[Any, Any]] = (),
    title: str = "corelens report",
    fracs: Sequence[float] = (0.05, 0.1, 0.2),
    seeds: Sequence[int] = tuple(range(8)),
    batch_size: int = 32,
    accel: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the study. Heads are chosen on ``examples`` (the scoring set); the ablation curve,
    the hybrid's accuracy and the patching effects are measured on ``eval_examples`` (the
    evaluation set; default: a seeded half of ``examples``, ``split_examples``), never on the
    examples that chose the heads. ``pairs``: (clean, corrupted) ``GroundedExample`` pairs with
    matching layouts for patching (skipped when empty), drawn from the evaluation set by the
    caller. Both sets (ids) are recorded in ``summary.json``. Returns the summary."""
    sources = dict(sources or {})
    if eval_examples is None:
        examples, eval_examples = split_examples(examples)
        sources = {"scoring": "split_examples(seed 0)", "evaluation": "split_examples(seed 0)"}
    examples, eval_examples = list(examples), list(eval_examples)
    check_disjoint(examples, [*eval_examples, *(c for c, _ in pairs)],
                   "the evaluation set or the patching pairs")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=5, desc=title, unit="step")

    scores = score_all(model, list(examples), batch_size=batch_size,
                       partial=out / "scores.partial.jsonl")
    ram = scores["ram"]
    ram.save(out / "ram.json")
    core = ram.top(frac=0.05)
    steps.update()

    curve = ablation_curve(model, eval_examples, ram, fracs=fracs, seeds=seeds,
                           batch_size=batch_size)
    curve.save(out / "ablation.json")
    acc = curve.to_dict("accuracy")
    i5 = list(fracs).index(0.05) if 0.05 in fracs else 0
    steps.update()

    patch_fig, path_effects, circuit = None, {}, None
    if pairs:
        pair = prepare_pair(model, [c for c, _ in pairs], [k for _, k in pairs])
        clean, corrupt, metric = pair.clean, pair.corrupted, pair.logit_diff
        effects = patch_heads(model, clean, corrupt, metric)
        base, full = metric_value(model, corrupt, metric), metric_value(model, clean, metric)
        patch_fig = views.patching_heatmap(effects - base, title="activation patching: "
                                           "logit diff restored by each head (clean -> corrupted)")
        for head in core:
            path_effects[head_name(head)] = path_patch(
                model, clean, corrupt, metric, [head], "logits") - base
        path_effects["clean_minus_corrupted"] = full - base
        if len(pairs) >= 4 and not model.family.sandwich_norms:  # edges need additive heads
            circuit = circuit_benchmark(model, list(pairs), ("eap-ig", "random"),
                                        seed=0, steps=5)
    steps.update()

    accel_result: dict[str, Any] = {}
    if accel is not None:  # CoRe-guided hybrid attention vs random heads at the same KV budget
        kw = {k: accel[k] for k in ("n_sink", "window", "n_pooled") if k in accel}
        hybrid = HybridAttention(model, ram.top(frac=accel.get("frac", 0.1)), **kw)
        rand = HybridAttention.random(model, len(hybrid.full_kv_heads), seed=0, **kw)
        accel_result = {"frac": accel.get("frac", 0.1), "kv_budget": hybrid.kv_budget, **kw,
                        "full": evaluate(model, eval_examples, progress=False).accuracy}
        for name, h in (("core_hybrid", hybrid), ("random_hybrid", rand)):
            with h.attach():
                accel_result[name] = evaluate(model, eval_examples, progress=False).accuracy

    show = model.prepare_examples(eval_examples[:1])
    items: list[Any] = [
        f"<h1>{title}</h1><p>CoRe heads (top 5% by RAM on the scoring set, {len(examples)} "
        f"examples): {', '.join(f'L{l}H{h}' for l, h in core)}. Ablation, patching and "
        f"acceleration are measured on the evaluation set ({len(eval_examples)} other "
        f"examples{f', {len(pairs)} clean/corrupted pairs' if pairs else ''}).</p>",
        views.head_heatmap(ram, title="RAM (Retrieval Attention Mass)"),
    ]
    if "selectivity" in scores:
        items.append(views.head_heatmap(scores["selectivity"], title="selectivity"))
    items += [views.ablation_curves(acc, title="ablation: top-k by RAM vs random vs bottom"),
              views.overlay_grid(model, show, ram.top(k=min(8, len(ram.rank()))))]
    if patch_fig is not None:
        items.append(patch_fig)
        items.append("<p>path patching (sender -> logits), logit diff restored: "
                     + ", ".join(f"{k}: {v:.3f}" for k, v in path_effects.items()) + "</p>")
    if circuit is not None:
        items.append(views.faithfulness_curves(
            [r.curve for r in circuit.results],
            title=f"edges ranked on {len(circuit.discovery)} pairs, faithfulness on "
                  f"{len(circuit.evaluation)} others"))
    if accel_result:
        items.append("<p>CoRe-guided hybrid attention (full attention only in the top heads, "
                     f"KV budget {accel_result['kv_budget']:.3f}): accuracy "
                     f"{accel_result['core_hybrid']:.3f} vs full {accel_result['full']:.3f} and "
                     f"random heads at the same budget {accel_result['random_hybrid']:.3f}</p>")
    items.append(views.attention_heads(model, show, core[0][0], heads=[core[0][1]],
                                       query_positions="query", collapse="row"))
    views.save_page(items, out / "report.html", title=title)
    steps.update()

    summary = {
        "core_heads": [[int(l), int(h)] for l, h in core],
        "ablation": {"frac": fracs[i5], "k": acc["ks"][i5], "none": acc["none"],
                     "top": acc["top"][i5], "random": acc["random_mean"][i5],
                     "random_lo": acc["random_lo"][i5], "random_hi": acc["random_hi"][i5],
                     "bottom": acc["bottom"][i5], "seeds": len(seeds)},
        "top_heads_by_ram": [[head_name((l, h)), round(ram[(l, h)], 4),
                              round(scores["selectivity"][(l, h)], 4)
                              if "selectivity" in scores else None]
                             for l, h in ram.top(k=5)],
        "path_patching": path_effects,
        "circuit": ({r.method: {"cpr": round(r.curve.cpr, 4), "cmd": round(r.curve.cmd, 4)}
                     for r in circuit.results} | {"discovery_pairs": circuit.discovery,
                                                   "evaluation_pairs": circuit.evaluation}
                    if circuit is not None else {}),
        "acceleration": accel_result,
        "scoring": _record(examples, sources.get("scoring", "examples")),
        "evaluation": {**_record(eval_examples, sources.get("evaluation", "eval_examples")),
                       "pairs": [[getattr(c, "id", None), getattr(k, "id", None)]
                                 for c, k in pairs]},
        "seconds": round(time.time() - t0, 1),
        **(extra or {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    steps.update()
    steps.close()
    return summary


def toy_pairs(examples: Sequence[Any], task: Any) -> list[tuple[Any, Any]]:
    """(clean, corrupted) pairs from scene examples: the queried object recoloured."""
    pairs = []
    for ex in examples:
        other = next(c for c in task.colors if c != ex.answer)
        pairs.append((ex, recolor_target(ex, other, task.background)))
    return pairs
