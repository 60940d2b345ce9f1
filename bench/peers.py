"""corelens vs nnsight 0.8.1: the same model, the same inputs, equal numbers, then time.

nnsight is an optional extra (``pip install -e '.[bench]'``); without it this prints
"nnsight is not installed: pip install -e '.[bench]'" and exits 0.

    BENCH_THREADS=1 python bench/peers.py --json                 # both widths
    BENCH_THREADS=1 python bench/peers.py --json --width toy --repeats 3
    BENCH_THREADS=1 python bench/peers.py --json --width real --real-heads all   # full sweep

Each width runs in its own process. In it, nnsight wraps a fresh HF copy of the same weights
(``nnsight.NNsight(AutoModelForImageTextToText.from_pretrained(folder))``; corelens's own
``model.hf_model`` carries TransformerLens's bridge modules, so nnsight on it would not trace
plain HF code), and both sides run on the same ``batch.inputs``. Per comparison both run once
and their outputs are compared (asserted equal within the tolerance: the check run is also
the warm-up), then ``--repeats`` timed rounds alternate the order of the two; the rows give
the median seconds of each (and, per round, the ratio of the two: its median, min and max).

Widths (``--width toy|real|both``):

- ``toy``: ``toy-llava`` (4 layers x 4 heads, d_model 128, 64 vision tokens), ``--pairs``
  clean/corrupted pairs (the queried object recoloured: ``zoo.scenes.recolor_target``).
- ``real``: a random LLaVA at LLaVA-1.5-7B's width, truncated (``bench/common.build_llava``:
  d_model 4096, 32 heads, 32 KV heads, 2 layers, toy vocabulary), one 384-px image = 576
  vision tokens, 587 tokens in all; ``--real-pairs`` pairs: the same prompt and teacher-forced
  answer "red", the corrupted image's square blue instead of red, metric logit("red") -
  logit("blue"). On CPU one forward of one example is ~7 s, so by default the sweep covers
  ``--real-heads 16`` heads (the first 8 of each layer: one stacked forward per layer for
  corelens, so the layer-1 forward resumes at layer 1 as in the full sweep) with the same code
  ``patch_heads`` runs (``cache_activations`` + ``sweep``), and the row also gives an estimate
  for all 64 heads (below: every layer is sampled alike, so the per-head cost scales).
  ``--real-heads all`` runs ``patch_heads``.

Rows (``rows[i]``: ``width``, ``comparison``, ``corelens_s``, ``nnsight_s``,
``ratio_nnsight_over_corelens`` (> 1: corelens is faster), the same by this process's CPU time
(``corelens_cpu_s``, ``nnsight_cpu_s``, ``cpu_ratio_nnsight_over_corelens``: steadier on a
shared machine, where a one-thread process also waits for a core), the median minor page
faults per call (``corelens_page_faults``, ``nnsight_page_faults``: their kernel time is inside
the CPU time; ``bench/instructions.py`` counts the user-space instructions per call of the toy
all-patterns comparison, which no load moves), ``max_abs_diff``, ``tolerance``):

- ``patch_heads_sweep``: the clean -> corrupted activation patching of each head's output z (the
  input of ``o_proj``, head h = columns h*d_head:(h+1)*d_head, all positions), metric the logit
  difference clean answer - corrupted answer at the answer position, mean over the pairs, per
  (layer, head). corelens: ``patching.patch_heads(model, pair.clean, pair.corrupted,
  pair.logit_diff)`` (batched: 8 patched copies per forward, the vision tower run once; each
  forward resumes at its patched layer, replays that layer's attention from the z recorded in
  the unedited run and runs the last block at the answer rows only:
  ``interventions.core.sweep``). nnsight: one trace of the clean inputs saving every layer's
  ``o_proj.input``, then one trace of the corrupted inputs per head assigning that head's slice
  and saving the answer row of ``lm_head.output`` (nnsight refuses to batch invokes of
  multimodal encodings -- "Can't batch these inputs; pass text or token ids" -- so its
  batched-invoker pattern does not apply). SDPA attention on both sides. Tolerance 1e-4. With a
  head subset the row adds ``heads_swept``, ``forward_s`` (one plain HF forward of the batch)
  and ``est_all_heads_corelens_s`` = 2 forwards + (L*H / K) * (corelens_s - 2 forwards),
  ``est_all_heads_nnsight_s`` = 1 forward + (L*H / K) * (nnsight_s - 1 forward) (corelens's
  fixed cost is the clean cache and the image-feature forward; nnsight's the clean cache), and
  ``est_all_heads_ratio``.
- ``all_patterns``: every decoder layer's attention pattern [batch, head, query, key] of the
  clean batch. corelens: ``model.run_with_cache(batch, names_filter=...)`` keeping
  ``blocks.*.attn.hook_pattern`` (the decoder's, as nnsight's side; the vision tower's
  pattern is left out on both). nnsight: the HF model switched to eager attention
  (``set_attn_implementation("eager")``, the only HF attention that returns weights), one trace
  saving ``self_attn.output[1]`` of every layer. Tolerance 1e-5.
- ``ram``: RAM per example, layer and head (docs/ram.md: the mean over the answer-predicting
  query rows of the attention mass on the evidence tokens). corelens: ``RamMetric(model)``,
  ``with metric.attach(batch): model(batch, return_type=None)``, ``example_level()["ram"]``
  (it computes every registered score of the pass, not RAM alone). nnsight: the eager model,
  one trace reducing each layer's ``self_attn.output[1]`` to the rows of
  ``batch.query_positions[e]`` and the columns of ``batch.evidence_positions(e)`` inside the
  trace. Tolerance 1e-5.

The report also holds the versions, threads, the load average before and after each width,
and ``goals``: issue #17's targets checked against the rows (sweep >= 3x nnsight's loop at
real width, not slower at toy size; all patterns <= 1.0x nnsight's time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, run_isolated, threads  # noqa: E402

MISSING = "nnsight is not installed: pip install -e '.[bench]'"
PINNED = "0.8.1"
REAL = dict(d_model=4096, layers=2, heads=32, kv_heads=32, image_size=384, patch=16)
TOL = {"patch_heads_sweep": 1e-4, "all_patterns": 1e-5, "ram": 1e-5}


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def nnsight_problem() -> str | None:
    """None when nnsight imports; else the message to print."""
    try:
        import nnsight  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"{MISSING} ({type(err).__name__}: {err})"
    return None


# --- the two widths ----------------------------------------------------------------------
def _toy(n_pairs: int, seed: int) -> tuple[Any, str, Any]:
    from corelens import zoo
    from corelens.interventions.patching import prepare_pair
    from corelens.zoo.scenes import recolor_target

    model = zoo.load("toy-llava")
    task = zoo.task("toy-llava")
    clean = zoo.examples("toy-llava", n_pairs, seed=seed)
    corrupted = [recolor_target(e, next(c for c in task.colors if c != e.answer),
                                task.background) for e in clean]
    return model, str(zoo.path("toy-llava")), prepare_pair(model, clean, corrupted)


def _real(n_pairs: int) -> tuple[Any, str, Any]:
    from PIL import Image, ImageDraw

    from corelens import HookedMLLM
    from corelens.data.examples import GroundedExample
    from corelens.interventions.patching import prepare_pair

    folder = tempfile.mkdtemp(prefix="corelens-bench-peers-real-")
    build_llava(folder, **REAL)
    model = HookedMLLM.from_pretrained(folder)
    px, side = REAL["image_size"], REAL["image_size"] // 4

    def example(i: int, colour: tuple[int, int, int], answer: str) -> GroundedExample:
        box = ((i * side) % (px - side), side, (i * side) % (px - side) + side, 2 * side)
        img = Image.new("RGB", (px, px), (90, 90, 90))
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        return GroundedExample([img], "what is the color ?", answer, [(0, box)], id=f"{i}")

    clean = [example(i, (200, 30, 30), "red") for i in range(n_pairs)]
    corrupted = [example(i, (30, 30, 200), "blue") for i in range(n_pairs)]
    return model, folder, prepare_pair(model, clean, corrupted)


# --- corelens ------------------------------------------------------------------------------
def corelens_sweep(model: Any, pair: Any, heads: list[tuple[int, int]] | None):
    """``patch_heads`` (heads None), or its very steps restricted to ``heads`` (NaN elsewhere)."""
    import torch

    from corelens.interventions.patching import patch_heads

    if heads is None:
        return patch_heads(model, pair.clean, pair.corrupted, pair.logit_diff)
    from corelens.hook_names import act_name
    from corelens.interventions.core import cache_activations, check_aligned, sweep

    check_aligned(pair.clean, pair.corrupted)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = [act_name("z", l) for l in range(L)]
    src = cache_activations(model, pair.clean, names)

    def job(l: int, h: int):
        def edit(x):
            x[:, :, h] = src[names[l]][:, :, h]
        return [(names[l], edit)]

    values = sweep(model, pair.corrupted, pair.logit_diff, [job(l, h) for l, h in heads],
                   per_forward=8)
    out = torch.full((L, H), float("nan"))
    for (l, h), v in zip(heads, values.mean(1)):
        out[l, h] = v
    return out


def corelens_patterns(model: Any, batch: Any):
    import torch

    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(
            "blocks.") and n.endswith("hook_pattern"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"]
                        for l in range(model.cfg.n_layers)])  # [layer, batch, head, q, k]


def corelens_ram(model: Any, batch: Any):
    import torch

    from corelens.scores.ram import RamMetric

    metric = RamMetric(model)
    with torch.no_grad(), metric.attach(batch):
        model(batch, return_type=None)
    return metric.example_level()["ram"]  # [example, layer, head]


# --- nnsight, as its user writes it --------------------------------------------------------
# (plain loops, not comprehensions: nnsight 0.8.1 does not carry a name bound by a list
# comprehension inside a trace out of it)
def nnsight_sweep(nn_model: Any, pair: Any, L: int, H: int, d_head: int,
                  heads: list[tuple[int, int]] | None):
    import torch

    layers = nn_model.model.language_model.layers
    clean, corrupted = dict(pair.clean.inputs), dict(pair.corrupted.inputs)
    q = pair.corrupted.last_prompt_positions
    rows = torch.arange(len(q))
    z = []
    with torch.no_grad():
        with nn_model.trace(**clean):
            for l in range(L):
                z.append(layers[l].self_attn.o_proj.input.save())
    out = torch.full((L, H), float("nan"))
    for l, h in heads if heads is not None else [(l, h) for l in range(L) for h in range(H)]:
        cols = slice(h * d_head, (h + 1) * d_head)
        with torch.no_grad():
            with nn_model.trace(**corrupted):
                layers[l].self_attn.o_proj.input[:, :, cols] = z[l][:, :, cols]
                logits = nn_model.lm_head.output[rows, q].save()
        out[l, h] = (logits[rows, pair.answer_ids] - logits[rows, pair.wrong_ids]).float().mean()
    return out


def nnsight_patterns(nn_model: Any, batch: Any, L: int):
    import torch

    layers = nn_model.model.language_model.layers
    pats = []
    with torch.no_grad():
        with nn_model.trace(**dict(batch.inputs)):
            for l in range(L):
                pats.append(layers[l].self_attn.output[1].save())
    return torch.stack(pats)


def nnsight_ram(nn_model: Any, batch: Any, L: int):
    import torch

    layers = nn_model.model.language_model.layers
    qs = [batch.query_positions[e] for e in range(len(batch))]
    evs = [batch.evidence_positions(e) for e in range(len(batch))]
    per_layer = []
    with torch.no_grad():
        with nn_model.trace(**dict(batch.inputs)):
            for l in range(L):
                attn = layers[l].self_attn.output[1]  # [batch, head, q, k]
                per_example = []
                for e in range(len(qs)):
                    per_example.append(attn[e][:, qs[e]][:, :, evs[e]].sum(-1).mean(-1))
                per_layer.append(torch.stack(per_example).save())
    return torch.stack(per_layer, 1)  # [example, layer, head]


# --- one width, in its own process ---------------------------------------------------------
def _compare(name: str, ours: Callable[[], Any], theirs: Callable[[], Any],
             repeats: int) -> dict:
    """Run both once, check equal numbers (the warm-up), then time alternating rounds."""
    a, b = ours(), theirs()
    finite = ~a.isnan()
    diff = float((a[finite].float() - b[finite].float()).abs().max())
    if not diff <= TOL[name]:
        raise AssertionError(f"{name}: corelens and nnsight differ (max |diff| {diff} > "
                             f"{TOL[name]})")
    times: dict[str, list[float]] = {"corelens": [], "nnsight": []}
    cpu: dict[str, list[float]] = {"corelens": [], "nnsight": []}
    faults: dict[str, list[int]] = {"corelens": [], "nnsight": []}
    for r in range(repeats):
        order = [("corelens", ours), ("nnsight", theirs)]
        for who, fn in order if r % 2 == 0 else order[::-1]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[who].append(time.perf_counter() - t)
            cpu[who].append(time.process_time() - c)
            faults[who].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    cl, nn = statistics.median(times["corelens"]), statistics.median(times["nnsight"])
    cl_cpu, nn_cpu = statistics.median(cpu["corelens"]), statistics.median(cpu["nnsight"])
    per_round = [n / max(c, 1e-9) for c, n in zip(times["corelens"], times["nnsight"])]
    return {"comparison": name, "corelens_s": round(cl, 4), "nnsight_s": round(nn, 4),
            "ratio_nnsight_over_corelens": round(nn / max(cl, 1e-9), 3),
            # CPU time of this process (one thread: the work each side does, without the
            # waits a shared machine adds to wall time)
            "corelens_cpu_s": round(cl_cpu, 4), "nnsight_cpu_s": round(nn_cpu, 4),
            "cpu_ratio_nnsight_over_corelens": round(nn_cpu / max(cl_cpu, 1e-9), 3),
            # minor page faults per call (kernel time inside the CPU time above)
            "corelens_page_faults": statistics.median(faults["corelens"]),
            "nnsight_page_faults": statistics.median(faults["nnsight"]),
            "ratio_per_round_median_min_max": [round(statistics.median(per_round), 3),
                                               round(min(per_round), 3),
                                               round(max(per_round), 3)],
            "max_abs_diff": diff, "tolerance": TOL[name], "equal": True,
            "corelens_all_s": [round(t, 4) for t in times["corelens"]],
            "nnsight_all_s": [round(t, 4) for t in times["nnsight"]]}


def run_width(width: str, n_pairs: int, repeats: int, real_heads: str, seed: int) -> dict:
    import nnsight
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(threads())
    load_start = _loadavg()
    model, folder, pair = _toy(n_pairs, seed) if width == "toy" else _real(n_pairs)
    L, H, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    heads = None
    if width == "real" and real_heads != "all" and int(real_heads) < L * H:
        per_layer = max(1, int(real_heads) // L)
        heads = [(l, h) for l in range(L) for h in range(per_layer)]
    hf = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    nn_model = nnsight.NNsight(hf)
    common = {"width": width, "n_examples": len(pair.clean), "seq_len": pair.clean.seq_len,
              "n_layers": L, "n_heads": H, "d_model": model.cfg.d_model}

    rows = []
    sweep_row = _compare(
        "patch_heads_sweep", lambda: corelens_sweep(model, pair, heads),
        lambda: nnsight_sweep(nn_model, pair, L, H, d_head, heads), repeats)
    sweep_row["heads_swept"] = L * H if heads is None else len(heads)
    if heads is not None:  # estimate all heads: fixed forwards + per-head cost scaled up
        inputs = dict(pair.corrupted.inputs)
        fwd = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            with torch.no_grad():
                hf(**inputs)
            fwd.append(time.perf_counter() - t)
        f, k = statistics.median(fwd), len(heads)
        est_cl = 2 * f + (L * H / k) * (sweep_row["corelens_s"] - 2 * f)
        est_nn = f + (L * H / k) * (sweep_row["nnsight_s"] - f)
        sweep_row.update(forward_s=round(f, 4), est_all_heads_corelens_s=round(est_cl, 2),
                         est_all_heads_nnsight_s=round(est_nn, 2),
                         est_all_heads_ratio=round(est_nn / max(est_cl, 1e-9), 3))
    rows.append(sweep_row)

    hf.set_attn_implementation("eager")  # attention weights: HF's eager attention only
    batch = pair.clean
    rows.append(_compare("all_patterns", lambda: corelens_patterns(model, batch),
                         lambda: nnsight_patterns(nn_model, batch, L), repeats))
    rows.append(_compare("ram", lambda: corelens_ram(model, batch),
                         lambda: nnsight_ram(nn_model, batch, L), repeats))
    load_end = _loadavg()
    if width == "real":  # the random model's 1.6 GB of weights
        shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        row.update(common, repeats=repeats, loadavg_start=load_start, loadavg_end=load_end)
    return {"rows": rows}


def goals(rows: list[dict]) -> list[dict]:
    """Issue #17's targets, checked against the rows that ran."""
    out = []
    for row in rows:
        w, c, r = row["width"], row["comparison"], row["ratio_nnsight_over_corelens"]
        if c == "patch_heads_sweep" and w == "real":
            partial = row["heads_swept"] < row["n_layers"] * row["n_heads"]
            ratio = row.get("est_all_heads_ratio", r) if partial else r
            out.append({"goal": "all-heads sweep >= 3x faster than nnsight's loop at real width",
                        "ratio": ratio, "met": ratio >= 3.0,
                        "basis": (f"estimate from {row['heads_swept']} of "
                                  f"{row['n_layers'] * row['n_heads']} heads" if partial
                                  else "measured, all heads")})
        elif c == "patch_heads_sweep" and w == "toy":
            out.append({"goal": "all-heads sweep not slower than nnsight's loop at toy size",
                        "ratio": r, "met": r >= 1.0, "basis": "measured, all heads"})
        elif c == "all_patterns":
            out.append({"goal": f"all patterns <= 1.0x nnsight's time ({w})", "ratio": r,
                        "met": r >= 1.0, "basis": "measured"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", choices=["toy", "real", "both"], default="both")
    ap.add_argument("--pairs", type=int, default=8, help="toy-llava pairs")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds at toy size")
    ap.add_argument("--seed", type=int, default=0, help="toy examples' seed")
    ap.add_argument("--real-pairs", type=int, default=1)
    ap.add_argument("--real-repeats", type=int, default=1)
    ap.add_argument("--real-heads", default="16",
                    help="heads swept at real width (split over the layers; a multiple of 8 "
                    "per layer keeps each stacked forward in one layer, so it resumes there), "
                    "or 'all' "
                    "(patch_heads itself; ~65 forwards a side: ~8 min a side on one CPU core)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_width")
    args = ap.parse_args()
    problem = nnsight_problem()
    if problem:
        print(json.dumps({"skipped": problem}) if args.json else problem)
        return
    if args._width:
        toy = args._width == "toy"
        print(json.dumps(run_width(args._width, args.pairs if toy else args.real_pairs,
                                   args.repeats if toy else args.real_repeats,
                                   args.real_heads, args.seed)))
        return
    import nnsight
    import torch
    import transformers

    if nnsight.__version__ != PINNED:
        print(f"note: nnsight {nnsight.__version__} installed; this bench pins {PINNED}",
              file=sys.stderr)
    rows: list[dict] = []
    for width in (["toy", "real"] if args.width == "both" else [args.width]):
        got = run_isolated(__file__, "--_width", width, "--pairs", str(args.pairs),
                           "--repeats", str(args.repeats), "--seed", str(args.seed),
                           "--real-pairs", str(args.real_pairs),
                           "--real-repeats", str(args.real_repeats),
                           "--real-heads", str(args.real_heads))
        rows.extend(got["rows"])
        if not args.json:
            for row in got["rows"]:
                extra = (f"  (all {row['n_layers'] * row['n_heads']} heads, estimated: "
                         f"{row['est_all_heads_ratio']}x)" if "est_all_heads_ratio" in row
                         else "")
                print(f"{width:4s} {row['comparison']:18s} corelens {row['corelens_s']:.3f}s  "
                      f"nnsight {row['nnsight_s']:.3f}s  nnsight/corelens "
                      f"{row['ratio_nnsight_over_corelens']:.2f}x (CPU time "
                      f"{row['cpu_ratio_nnsight_over_corelens']:.2f}x)  max|diff| "
                      f"{row['max_abs_diff']:.1e}{extra}  load {row['loadavg_start']} -> "
                      f"{row['loadavg_end']}", flush=True)
    report = {"nnsight": nnsight.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": threads(),
              "rows": rows, "goals": goals(rows)}
    print(json.dumps(report, indent=1 if args.json else None))


if __name__ == "__main__":
    main()
