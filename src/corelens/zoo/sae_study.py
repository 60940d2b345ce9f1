"""CoRe meets SAEs on a shipped toy model: do the SAE features that carry the queried object's
colour matter as much as the retrieval (CoRe) heads that put it there? (issue #18, items 4-5)

    python -m corelens.zoo.sae_study [--out bench/results/sae_study.json] [--work runs/sae_study]

On ``toy-llava``, four disjoint held-out sets: RAM on SELECTION ranks the heads (the retrieval
layer L is the top heads'); a top-k SAE on ``blocks.L.hook_resid_post`` (all token roles) is
trained on TRAIN, measured on SAE_EVAL and shipped (SAELens format + ``metrics.json``, in
``zoo/models/toy-llava/saes/<hook>/``; reused when it records this configuration); per colour,
the features whose mean activation at the query position (the last prompt token) differs most
between SELECTION examples of that colour and the rest; on EVALUATION, accuracy and answer
log-prob clean, with the SAE spliced, with those features zeroed at the query position (error
term kept), with random active features, top RAM heads or random heads ablated, and the colour a
linear probe still reads at the query position. Resumable (partial files and SAE checkpoints in
``--work``); ``--out`` is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from corelens import zoo
from corelens.core.evaluate import score_logits
from corelens.heads import Head, head_name
from corelens.hook_names import act_name
from corelens.interventions.ablation import ablate
from corelens.runner import run_units
from corelens.saes import SAE, ActivationStore, evaluate, run_with_hooks_with_saes
from corelens.saes.store import ROLES, capture
from corelens.saes.train import train_sae
from corelens.scores.ram import score_heads


@dataclass(frozen=True)
class Config:
    """Everything that defines the study (the shipped SAE's ``metrics.json`` records it)."""

    model: str = "toy-llava"
    sets: dict[str, tuple[int, int]] = field(default_factory=lambda: {  # name: (seed, n)
        "train": (20, 4096), "sae_eval": (21, 512), "selection": (22, 1024),
        "evaluation": (23, 1024)})
    d_sae: int = 256
    k: int = 16
    steps: int = 1000
    lr: float = 1e-3
    out_batch_size: int = 1024
    dead_feature_window: int = 200
    sae_seed: int = 0
    per_colour: int = 3  # features kept per colour in the main condition
    sweep: tuple[int, ...] = (1, 2, 3, 5)  # features per colour in the sweep
    head_ks: tuple[int, ...] = (1, 2)
    random_seeds: int = 5
    batch_size: int = 64


def shipped_dir(hook_name: str, model: str = "toy-llava") -> Path:
    """Where the study's SAE ships: ``corelens/zoo/models/<model>/saes/<hook_name>/``."""
    return zoo.MODELS_DIR / model / "saes" / hook_name


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _labels(examples: Sequence[Any], colours: Sequence[str]) -> torch.Tensor:
    return torch.tensor([colours.index(str(e.answer)) for e in examples])


# ------------------------------------------------------------------------------------ the SAE
@torch.no_grad()
def query_rows(model: Any, examples: Sequence[Any], hook_name: str,
               batch_size: int = 64) -> torch.Tensor:
    """The activation at ``hook_name`` at each example's answer-predicting position, ``[n, d]``."""
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = model.prepare_examples(examples[start:start + batch_size])
        act = capture(model, batch, hook_name)
        q = batch.last_prompt_positions.to(act.device)
        rows.append(act[torch.arange(len(q), device=act.device), q].float().cpu())
    return torch.cat(rows)


def sae_metrics(model: Any, sae: SAE, examples: Sequence[Any], batch_size: int = 64
                ) -> dict[str, Any]:
    """``saes.evaluate`` over every token of ``examples``, per role, at the query position."""
    hook = sae.cfg.metadata.hook_name
    out = {role: evaluate(sae, ActivationStore(model, examples, hook, roles=roles,
                                               batch_size=batch_size, progress=False))
           for role, roles in [("all", ROLES)] + [(r, (r,)) for r in ("vision", "text",
                                                                        "answer")]}
    out["query_position"] = evaluate(sae, [query_rows(model, examples, hook, batch_size)])
    return out


def get_sae(model: Any, cfg: Config, sets: dict[str, list[Any]], hook_name: str, work: Path,
            retrain: bool = False) -> tuple[SAE, dict[str, Any]]:
    """The shipped SAE if it was made with ``cfg``, else train (resumably) and ship it."""
    folder = shipped_dir(hook_name, cfg.model)
    recipe = {"config": asdict(cfg), "hook_name": hook_name}
    if not retrain and (folder / "metrics.json").is_file():
        info = json.loads((folder / "metrics.json").read_text())
        if info.get("recipe") == json.loads(json.dumps(recipe)):
            print(f"SAE: shipped {folder} (made with this configuration)")
            return SAE.load(folder), info
    store = ActivationStore(model, sets["train"], hook_name, batch_size=cfg.batch_size,
                            buffer_tokens=cfg.batch_size * 8 * 80,
                            out_batch_size=cfg.out_batch_size, seed=cfg.sae_seed, epochs=None)
    t0 = time.perf_counter()
    result = train_sae(store, cfg.d_sae, "topk", k=cfg.k, lr=cfg.lr, steps=cfg.steps,
                       normalize_activations="expected_average_only_in",
                       dead_feature_window=cfg.dead_feature_window, seed=cfg.sae_seed,
                       checkpoint=work / f"sae_{_digest(recipe)}", checkpoint_every=250)
    sae, train_s = result.sae, round(time.perf_counter() - t0, 1)
    sae.cfg.metadata.model_name = cfg.model
    metrics = sae_metrics(model, sae, sets["sae_eval"], cfg.batch_size)
    metrics["first_64"] = sae_metrics(model, sae, sets["sae_eval"][:64], cfg.batch_size)
    files = sae.save(folder)
    info = {"recipe": recipe, "metrics": metrics, "train_seconds": train_s,
            "train_steps": result.steps, "bytes": {p.name: p.stat().st_size for p in files}}
    (folder / "metrics.json").write_text(json.dumps(info, indent=2))
    if sum(p.stat().st_size for p in folder.iterdir()) >= 2 ** 20:
        raise RuntimeError(f"{folder} is over 1 MB: lower d_sae")
    return sae, info


# ----------------------------------------------------------------------- colour features
@torch.no_grad()
def colour_features(model: Any, sae: SAE, examples: Sequence[Any], colours: Sequence[str],
                    n: int, batch_size: int = 64) -> dict[str, Any]:
    """Per colour, the ``n`` features whose mean activation at the query position is highest
    for the examples answered with that colour relative to the rest (difference of means),
    with their statistics; and the features that fire there at all (the random pool)."""
    feats = sae.encode(query_rows(model, examples, sae.cfg.metadata.hook_name, batch_size)
                       .to(sae.device, sae.dtype)).float().cpu()
    answer = _labels(examples, colours)
    per: dict[str, list[dict[str, Any]]] = {}
    for c, colour in enumerate(colours):
        inside, rest = feats[answer == c], feats[answer != c]
        top = (inside.mean(0) - rest.mean(0)).topk(n)
        per[colour] = [{"feature": f, "diff": round(d, 4),
                        "mean_in": round(float(inside[:, f].mean()), 4),
                        "fires_in": round(float((inside[:, f] > 0).float().mean()), 4),
                        "fires_out": round(float((rest[:, f] > 0).float().mean()), 4)}
                       for d, f in zip(top.values.tolist(), top.indices.tolist())]
    return {"per_colour": per, "n_examples": len(examples),
            "counts": {c: int((answer == i).sum()) for i, c in enumerate(colours)},
            "active_at_query": torch.nonzero((feats > 0).any(0)).flatten().tolist(),
            "l0_at_query": float((feats > 0).sum(1).float().mean())}


@torch.no_grad()
def readout(model: Any, fit: Sequence[Any], examples: Sequence[Any], hook_name: str,
            colours: Sequence[str], batch_size: int = 64) -> Callable[[torch.Tensor], dict]:
    """``measure(rows)``: how much of the queried colour the query-position rows of
    ``examples`` at ``hook_name`` (under some ablation) still carry: the accuracy of a
    logistic-regression probe fitted (standardised inputs, Adam, fixed seed) on the clean rows
    of ``fit`` (another set), and the fraction of the clean rows' between-colour variance (sum
    over colours of n_c ||mean_c - mean||^2) left."""
    x, label = query_rows(model, fit, hook_name, batch_size), _labels(fit, colours)
    mean, std = x.mean(0), x.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.nn.Linear(x.shape[1], len(colours))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(500):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe((x - mean) / std), label).backward()
            opt.step()
    y = _labels(examples, colours)

    def between(z: torch.Tensor) -> float:
        return float(sum((y == c).sum() * (z[y == c].mean(0) - z.mean(0)).pow(2).sum()
                         for c in y.unique()))
    base = between(query_rows(model, examples, hook_name, batch_size))
    return lambda z: {
        "probe_accuracy": round(float((probe((z - mean) / std).argmax(1) == y).float().mean()),
                                4), "between_colour_variance_left": round(between(z) / base, 4)}


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def run_condition(model: Any, examples: Sequence[Any], spec: dict[str, Any],
                  sae: SAE | None = None, batch_size: int = 64,
                  measure: tuple[str, Callable[[torch.Tensor], dict]] | None = None
                  ) -> dict[str, Any]:
    """Accuracy and answer log-probs of ``model`` on ``examples`` under condition ``spec``
    (``conditions``): ``kind`` "clean", "sae" (``sae`` spliced, with ``error_term`` or not; the
    record has the largest |logit change| vs no SAE), "features" (``sae`` spliced with its error
    term, ``features`` zeroed at the query position: a list, or {answer: features}) or "heads"
    (``heads`` zero-ablated). ``measure=(hook_name, fn)``: also ``fn(query-position rows)``."""
    kind, features = spec["kind"], spec.get("features", ())
    sae = sae if kind in ("sae", "features") else None
    lps, oks, max_diff, rows = [], [], 0.0, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = model.prepare_examples(chunk)
        q = batch.last_prompt_positions
        hooks = [] if measure is None else [(measure[0], lambda act, hook, q=q: rows.append(
            act[torch.arange(len(q)), q.to(act.device)].float().cpu()))]
        if features:
            assert sae is not None
            mask = torch.zeros(len(chunk), batch.seq_len, sae.cfg.d_sae, dtype=torch.bool)
            for e, ex in enumerate(chunk):  # the query position only
                mask[e, int(q[e]), list(features.get(str(ex.answer), [])
                                        if isinstance(features, dict) else features)] = True
            hooks.insert(0, (sae.cfg.metadata.hook_name + ".hook_sae_acts_post", lambda acts,
                             hook, mask=mask: acts.masked_fill(mask.to(acts.device), 0.0)))
        with ablate(model, [tuple(h) for h in spec.get("heads", ())]):
            logits = model.run_with_hooks(batch, fwd_hooks=hooks) if sae is None else \
                run_with_hooks_with_saes(model, batch, [sae], fwd_hooks=hooks,
                                         use_error_term=spec.get("error_term", True))
            if kind == "sae":
                max_diff = max(max_diff, float((logits - model(batch)).abs().max()))
        lp, ok, _ = score_logits(logits, batch)
        lps.append(lp.cpu())
        oks.append(ok)
    lp, ok = torch.cat(lps), torch.cat(oks)
    rec = {"accuracy": float(ok.float().mean()), "mean_logprob": float(lp.mean()),
           "n": len(lp), "logprobs": [round(float(x), 5) for x in lp]}
    if kind == "sae":
        rec["max_abs_logit_diff_vs_clean"] = max_diff
    if measure is not None:
        rec.update(measure[1](torch.cat(rows)))
    return rec


def _draw(pool: list[Any], k: int, seed: int) -> list[Any]:
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
    return [pool[i] for i in pick.tolist()]


def conditions(cfg: Config, per_colour: dict[str, list[dict[str, Any]]], pool: list[int],
               ranked: list[Head], n_heads: int, n_layers: int) -> dict[str, dict[str, Any]]:
    """Every evaluation condition by name: {"kind", "features"/"heads", ...}."""
    out: dict[str, dict[str, Any]] = {
        "clean": {"kind": "clean"},
        "sae_error_term": {"kind": "sae", "error_term": True},
        "sae_no_error_term": {"kind": "sae", "error_term": False}}
    for n in cfg.sweep:
        chosen = sorted({f["feature"] for fs in per_colour.values() for f in fs[:n]})
        out[f"colour_features_n{n}"] = {"kind": "features", "features": chosen,
                                        "per_colour": n}
        others = [f for f in pool if f not in chosen]
        for s in range(cfg.random_seeds):
            out[f"random_features_n{n}_s{s}"] = {
                "kind": "features", "features": sorted(_draw(others, len(chosen), 1000 * n + s)),
                "per_colour": n, "seed": s}
    n = cfg.per_colour
    out[f"own_colour_features_n{n}"] = {
        "kind": "features", "per_colour": n,
        "features": {c: [f["feature"] for f in fs[:n]] for c, fs in per_colour.items()}}
    for k in cfg.head_ks:
        out[f"core_heads_k{k}"] = {"kind": "heads", "heads": [list(h) for h in ranked[:k]]}
        others = [(layer, h) for layer in range(n_layers) for h in range(n_heads)
                  if (layer, h) not in ranked[:k]]
        for s in range(cfg.random_seeds):
            out[f"random_heads_k{k}_s{s}"] = {
                "kind": "heads", "seed": s,
                "heads": [list(h) for h in _draw(others, k, 2000 * k + s)]}
    return out


# ----------------------------------------------------------------------------------- the table
def _cell(vals: list[float], sign: str = "") -> str:
    mean = f"{sum(vals) / len(vals):{sign}.3f}"
    return mean if len(vals) == 1 else f"{mean} ({min(vals):.3f} to {max(vals):.3f})"


def table(results: dict[str, Any]) -> str:
    """The study's Markdown table (random rows: mean over seeds, (min to max))."""
    cfg, conds, specs = results["config"], results["conditions"], results["specs"]
    clean, n_rand = conds["clean"]["mean_logprob"], cfg["random_seeds"]
    seeds = [f"_s{s}" for s in range(n_rand)]

    def row(label: str, what: str, names: list[str]) -> str:
        recs = [dict(conds[n], change=conds[n]["mean_logprob"] - clean) for n in names]
        return f"| {label} | {what} | " + " | ".join(_cell(
            [r[key] for r in recs], "+" * (key == "change")) for key in (
            "accuracy", "mean_logprob", "change", "probe_accuracy",
            "between_colour_variance_left")) + " |"

    lines = ["| condition (EVALUATION set) | ablated | accuracy | mean answer log-prob | change "
             "| colour probe accuracy at the query position | between-colour variance left |",
             "|---|---|---|---|---|---|---|", row("clean", "-", ["clean"]),
             row("SAE spliced, error term kept", "- (max abs logit change "
                 f"{conds['sae_error_term']['max_abs_logit_diff_vs_clean']:.1e})",
                 ["sae_error_term"]),
             row("SAE spliced, no error term", "the SAE's error", ["sae_no_error_term"])]
    for m in cfg["sweep"]:
        size = len(specs[f"colour_features_n{m}"]["features"])
        lines += [row(f"colour features, {m} per colour", f"{size} features",
                      [f"colour_features_n{m}"]),
                  row(f"random active features, {n_rand} seeds", f"{size} features",
                      [f"random_features_n{m}{s}" for s in seeds])]
    n = cfg["per_colour"]
    lines.append(row(f"the answer colour's {n} features only", f"{n} features",
                     [f"own_colour_features_n{n}"]))
    for k in cfg["head_ks"]:
        heads = " ".join(head_name(tuple(h)) for h in specs[f"core_heads_k{k}"]["heads"])
        lines += [row(f"top {k} CoRe head{'s' * (k > 1)} (RAM on SELECTION)", heads,
                      [f"core_heads_k{k}"]),
                  row(f"random other heads, {n_rand} seeds", f"{k} head{'s' * (k > 1)}",
                      [f"random_heads_k{k}{s}" for s in seeds])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def study(out: Path, work: Path, cfg: Config = Config(), retrain: bool = False,
          device: Any = None) -> dict[str, Any]:
    """Run the study (see the module doc); returns the results written to ``out``."""
    t_all = time.perf_counter()
    model = zoo.load(cfg.model, device=device)
    sets = {name: zoo.examples(cfg.model, n, seed=seed) for name, (seed, n) in cfg.sets.items()}
    colours = list(zoo.task(cfg.model).colors)
    sec: dict[str, float] = {}
    results: dict[str, Any] = {"complete": False, "config": asdict(cfg), "seconds": sec,
                               "sets": {k: {"seed": cfg.sets[k][0], "n": len(v),
                                            "ids": [e.id for e in v]}
                                        for k, v in sets.items()}}

    def stage(name: str, t0: float) -> None:  # record its time, rewrite ``out``
        sec[name] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".tmp").write_text(json.dumps(results, indent=1))
        out.with_name(out.name + ".tmp").replace(out)

    t0 = time.perf_counter()
    ram = score_heads(model, sets["selection"], "ram", batch_size=cfg.batch_size,
                      partial=work / "ram_selection.jsonl")
    ranked = ram.rank()
    layer = Counter(h[0] for h in ranked[:max(cfg.head_ks)]).most_common(1)[0][0]
    hook_name = act_name("resid_post", layer)
    results["ram"] = {"set": "selection", "retrieval_layer": layer, "hook_name": hook_name,
                      "top": [{"head": head_name(h), "ram": round(ram[h], 5)}
                              for h in ranked[:8]]}
    stage("ram", t0)

    t0 = time.perf_counter()
    sae, info = get_sae(model, cfg, sets, hook_name, work, retrain)
    results["sae"] = {"folder": str(shipped_dir(hook_name, cfg.model).relative_to(
        zoo.MODELS_DIR.parents[2])), **info}
    stage("sae", t0)

    t0 = time.perf_counter()
    sel = colour_features(model, sae, sets["selection"], colours, max(cfg.sweep),
                          cfg.batch_size)
    specs = conditions(cfg, sel["per_colour"], sel["active_at_query"], ranked,
                       model.cfg.n_heads, model.cfg.n_layers)
    results.update(selection=sel, specs=specs)
    stage("selection", t0)

    t0 = time.perf_counter()
    measure = (hook_name, readout(model, sets["selection"], sets["evaluation"], hook_name,
                                  colours, cfg.batch_size))
    recs = run_units(list(specs), lambda name: run_condition(
        model, sets["evaluation"], specs[name], sae, cfg.batch_size, measure),
                     partial=work / "conditions.jsonl", desc="conditions",
                     run={"specs": _digest(specs), "evaluation": list(cfg.sets["evaluation"]),
                          "sae": _digest([info["recipe"], info["metrics"]["all"]])})
    assert recs is not None
    clean = recs["clean"]["logprobs"]
    results["conditions"] = {
        name: {k: v for k, v in r.items() if k not in ("unit", "run", "logprobs")}
        | {"delta_logprob": sum(a - b for a, b in zip(r["logprobs"], clean)) / len(clean)}
        for name, r in recs.items()}
    results.update(complete=True, table=table(results))
    sec["conditions"] = round(time.perf_counter() - t0, 1)
    stage("total", t_all)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m corelens.zoo.sae_study",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/sae_study.json")
    ap.add_argument("--work", default="runs/sae_study",
                    help="partial files and SAE checkpoints (resume: rerun the same command)")
    ap.add_argument("--retrain", action="store_true",
                    help="train the SAE even if the shipped one was made with this config")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the toy model is small: more threads only contend
    res = study(Path(args.out), Path(args.work), retrain=args.retrain)
    m = res["sae"]["metrics"]["all"]
    print(f"\nSAE {res['ram']['hook_name']}: held-out explained variance "
          f"{m['explained_variance']:.4f}, L0 {m['l0']:.2f}\n\n{res['table']}\n\nseconds: "
          f"{res['seconds']}; written to {args.out}")


if __name__ == "__main__":
    main()
