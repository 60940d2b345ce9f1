"""A prepared GPU check: one command to run whenever a GPU machine is available (CI never needs it).

    python bench/gpu_check.py --out bench/results/gpu_check.json     # --device cuda, bfloat16
    python bench/gpu_check.py --sections parity ram --tokens 1024 5120
    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # every path, CPU

``--out`` is rewritten after every family / token count / section, so a crash keeps what
finished; it records the device's name, the torch / transformers / transformer-lens versions
(``corelens.compat.versions()``), the settings and the command line. A short summary is printed
at the end. ``--sections`` picks among:

- ``parity``: per family (``corelens.families.FAMILIES``), the tiny random model
  (``corelens.zoo.tiny.build_tiny``, seed 0) loaded as a ``HookedMLLM`` and as the plain HF
  model, both on the device, in ``--dtype`` and again in float32; the same prepared batch (3
  left-padded examples: ``grounded_examples`` of tests/conftest.py). Max |logit diff| over the
  real (non-padding) positions, under both corelens attention paths (sdpa, eager), and whether
  it is within the tolerance (``TOLERANCE``: float32 absolute 1e-4; bf16 / fp16 relative to the
  logits' scale). An error in one family is recorded and the run goes on.
- ``ram``: RAM scoring vs the forward on a random LLaVA-shaped model at real width (default
  d_model 4096, 32 heads, 2 layers, vocab 32,000: LLaVA-1.5-7B's width) at ``--tokens``
  (default 1,024 / 5,120 / 16,384: images of ``--ram-side``^2 = 1,024 vision tokens each, one
  model for every count; bench/ram.py's prompt, answer and evidence box). Time (median of
  ``--repeats`` after ``--warmup`` calls, CUDA-synchronized) and peak memory of the HF forward
  (all logits), the HF forward with ``logits_to_keep=batch.logits_to_keep``, and corelens's RAM
  scoring (``RamMetric`` attached, ``return_type=None``: what ``score_all`` runs); the RAM run's
  ratios to each.
- ``hybrid``: bench/accel.py's ``hf_sdpa`` (baseline), ``corelens_full`` and ``hybrid`` variants
  on its pinned decoder (8 layers, 8 heads, d_model ``--hybrid-d-model``; 10 % full heads,
  n_sink 4, window 64) at ``--hybrid-tokens`` (its token counts): prefill time (batch 1) and
  decode step time (batch ``--batch``, preallocated cache, median of ``--steps`` steps after 2
  warm-up steps); speed-ups vs ``hf_sdpa`` and KV bytes ratio.
- ``torchrun``: with >= 2 GPUs, ``python -m torch.distributed.run --standalone
  --nproc_per_node 2 -m corelens score --metric all`` (NCCL) on the tiny LLaVA and 7 examples,
  against the same command in one process (``score_all`` with a world of one: the same score
  parameters as the CLI's by construction): max |diff| of every score (0 expected: each batch
  runs whole on one rank). One GPU: "skipped: 1 GPU". ``--device cpu``: two gloo ranks (as
  tests/test_distributed.py).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(``peak_mb``) and that minus the memory allocated before the call (``peak_delta_mb``: the call's
working memory, weights and inputs excluded; the ratios use it). On the CPU: the peak RSS delta
of the first call (bench/common.py's ``timed``; there the first call is the warm-up).

``--quick``: tiny widths, small token counts, 1 repeat; with ``--device cpu`` it exercises every
code path in about a minute on 2 cores (tests/test_gpu_check.py). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.append(str(BENCH.parent / "tests"))  # conftest's grounded_examples
import accel  # noqa: E402
import ram  # noqa: E402
from common import build_llava, timed  # noqa: E402

SECTIONS = ("parity", "ram", "hybrid", "torchrun")
HYBRID_VARIANTS = ("hf_sdpa", "corelens_full", "hybrid")
FP32_ATOL = 1e-4
LOW_RTOL = 2e-2
TOLERANCE = {
    "float32": f"max |diff| <= {FP32_ATOL:g} (absolute; tests/conftest.py's assert_matches_hf)",
    "bfloat16/float16": f"max |diff| <= {LOW_RTOL:g} * max |HF logit| over the real positions "
                        "(~2.5 bf16 eps: a rounding step or two at the largest logit)",
}
# settings: (GPU run, --quick); a flag given on the command line wins
DEFAULTS = {
    "tokens": ([1024, 5120, 16384], [64, 256]),
    "ram_side": (32, 8),
    "d_model": (4096, 64),
    "heads": (32, 4),
    "layers": (2, 2),
    "vocab": (32000, 1000),
    "hybrid_tokens": ([2304, 8192], [576]),
    "hybrid_d_model": (accel.D_MODEL, 64),
    "batch": (8, 2),
    "steps": (20, 2),
    "repeats": (5, 1),
    "warmup": (2, 1),
}
PARITY_EXAMPLES, TORCHRUN_EXAMPLES, TORCHRUN_BATCH = 3, 7, 2


# --- helpers --------------------------------------------------------------------------------
def _error(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-3000:]}


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded; None where either is missing or not positive (a CPU RSS delta can be 0:
    the allocator reused memory, and a ratio of 0 or of 0 would mean nothing)."""
    if a is None or b is None or not b > 0 or not a > 0 or not math.isfinite(a):
        return None
    return round(a / b, 3)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats: int, warmup: int) -> dict:
    """Median seconds of ``repeats`` calls of ``fn`` and the peak memory of one call (MB; the
    module docstring says which)."""
    import torch

    if device.type != "cuda":
        out = timed(fn, repeats)  # first call: peak RSS (and warm-up), then the repeats
        return {"seconds": out["seconds"], "peak_delta_mb": round(out["peak_rss_delta_mb"], 1)}
    for _ in range(warmup):
        fn()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_mb": round(peak / 2**20, 1),
            "peak_delta_mb": round((peak - base) / 2**20, 1)}


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


# --- parity ---------------------------------------------------------------------------------
def _tolerance(dtype, scale: float) -> float:
    import torch

    return FP32_ATOL if dtype == torch.float32 else LOW_RTOL * scale


def parity_one(family: str, folder: str, device, dtype) -> dict:
    """HookedMLLM vs the plain HF model of ``family`` on one batch, both in ``dtype``."""
    import torch
    from conftest import grounded_examples
    from transformers import AutoConfig

    from corelens import HookedMLLM
    from corelens.families import FAMILIES

    model = HookedMLLM.from_pretrained(folder, device=device, dtype=dtype)
    ref = FAMILIES[family].hf_class(AutoConfig.from_pretrained(folder)).from_pretrained(
        folder, dtype=dtype).to(device).eval()
    batch = model.prepare_examples(grounded_examples(family, PARITY_EXAMPLES))
    real = batch.attention_mask.bool()
    diffs = {}
    with torch.no_grad():
        expected = ref(**batch.inputs).logits.float()
        for mode in ("sdpa", "eager"):
            with model.attention.use(mode):
                got = model(batch).float()
            diffs[mode] = float((got - expected)[real].abs().max())
    scale = float(expected[real].abs().max())
    tol = _tolerance(dtype, scale)
    return {"max_abs_diff": diffs, "max_abs_logit": scale, "tolerance": tol,
            "ok": all(d <= tol for d in diffs.values())}


def parity_section(section: dict, cfg, device, save) -> None:
    import torch

    from corelens.families import FAMILIES
    from corelens.zoo.tiny import build_tiny

    section.update(rule=TOLERANCE, examples=PARITY_EXAMPLES, families={})
    dtypes = list(dict.fromkeys([cfg.torch_dtype, torch.float32]))
    for family in sorted(FAMILIES):
        entry = section["families"][family] = {}
        folder = tempfile.mkdtemp(prefix=f"corelens-gpu-check-{family}-")
        try:
            build_tiny(family, folder, seed=0)
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                try:
                    entry[name] = parity_one(family, folder, device, dtype)
                except Exception as err:  # recorded; the next one runs
                    entry[name] = _error(err)
                _free()
        except Exception as err:
            entry.update(_error(err))
        shutil.rmtree(folder, ignore_errors=True)
        save()
    section["all_ok"] = all(r.get("ok", False) for e in section["families"].values()
                            for r in e.values() if isinstance(r, dict))


# --- RAM vs forward -------------------------------------------------------------------------
def _ram_batch(folder: str, tokens: int, side: int, device):
    """bench/ram.py's input at ``tokens`` vision tokens: round(tokens / side^2) images of
    side x side tokens (ram.TOKENS extended with that entry)."""
    ram.TOKENS[tokens] = (side, max(1, round(tokens / side**2)))  # this process's mapping
    return ram._batch_inputs(folder, tokens).to(device)


def _hf_forward(hf, batch, keep: bool):
    import torch

    ids, kw = batch.input_ids, batch.model_kwargs()
    extra = {"logits_to_keep": batch.logits_to_keep} if keep else {}

    def fn():
        with torch.no_grad():
            return hf(input_ids=ids, **kw, **extra).logits
    return fn


def _ram_scoring(model, batch, result: dict):
    import torch

    from corelens.scores.ram import RamMetric

    metric = RamMetric(model)

    def fn():
        with torch.no_grad(), metric.attach(batch):
            model(batch, return_type=None)  # as score_all: no logits are read
        result["ram"] = metric.example_level()["ram"]
    return fn


def _ram_rows(section: dict, cfg, device, folder: str, batches: dict, save) -> None:
    """Each variant's model loaded once, measured at every token count, then freed."""
    from corelens import HookedMLLM

    rows = {r["tokens"]: r for r in section["rows"]}
    hf = accel._setup(folder, "hf_sdpa", batches[cfg.tokens[0]], {}, device=device,
                      dtype=cfg.torch_dtype)[0]  # bench/accel.py's HF load (SDPA)
    for variant, keep in (("hf_forward", False), ("hf_forward_logits_to_keep", True)):
        for tokens, batch in batches.items():
            try:
                rows[tokens][variant] = measure(_hf_forward(hf, batch, keep), device,
                                                cfg.repeats, cfg.warmup)
            except Exception as err:
                rows[tokens][variant] = _error(err)
            _free()
            save()
    del hf
    _free()
    model = HookedMLLM.from_pretrained(folder, device=device, dtype=cfg.torch_dtype)
    for tokens, batch in batches.items():
        result: dict = {}
        try:
            row = rows[tokens]["corelens_ram"] = measure(_ram_scoring(model, batch, result),
                                                         device, cfg.repeats, cfg.warmup)
            values = result["ram"].float()
            row["ram_finite"] = bool(values.isfinite().all())
            row["ram_range"] = [float(values.min()), float(values.max())]
        except Exception as err:
            rows[tokens]["corelens_ram"] = _error(err)
        _free()
        save()


def _ram_ratios(row: dict) -> dict:
    ram_run = row.get("corelens_ram", {})
    out = {}
    for base, name in (("hf_forward", "forward"), ("hf_forward_logits_to_keep",
                                                   "logits_to_keep")):
        other = row.get(base, {})
        out[f"time_ram_over_{name}"] = _ratio(ram_run.get("seconds"), other.get("seconds"))
        out[f"peak_mem_ram_over_{name}"] = _ratio(ram_run.get("peak_delta_mb"),
                                                  other.get("peak_delta_mb"))
    return out


def ram_section(section: dict, cfg, device, save) -> None:
    model = {"d_model": cfg.d_model, "heads": cfg.heads, "layers": cfg.layers,
             "vocab": cfg.vocab, "grid_side": cfg.ram_side, "patch": ram.PATCH}
    section.update(model=model, rows=[])
    folder = tempfile.mkdtemp(prefix="corelens-gpu-check-ram-")
    try:
        build_llava(folder, image_size=cfg.ram_side * ram.PATCH, patch=ram.PATCH,
                    d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads,
                    vocab_size=cfg.vocab)
        batches = {t: _ram_batch(folder, t, cfg.ram_side, device) for t in cfg.tokens}
        section["rows"] = [{"tokens": t, "images": ram.TOKENS[t][1], "seq_len": b.seq_len,
                            "logits_to_keep": b.logits_to_keep} for t, b in batches.items()]
        save()
        _ram_rows(section, cfg, device, folder, batches, save)
        for row in section["rows"]:
            row["ratios"] = _ram_ratios(row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- hybrid attention -----------------------------------------------------------------------
def hybrid_variant(folder: str, variant: str, mb, shared: dict, cfg, device) -> dict:
    """Prefill and decode of one bench/accel.py variant (models shared between variants)."""
    import torch

    torch.manual_seed(0)
    hf, hybrid, _, prefill = accel._setup(folder, variant, mb, shared, device=device,
                                          dtype=cfg.torch_dtype)
    pre = measure(prefill, device, cfg.repeats, cfg.warmup)
    step, kv_bytes, first, extra = accel._decoder(variant, hf, hybrid, prefill, mb, cfg.steps,
                                                  cfg.batch, accel._attention(shared))
    toks, times = [first], []
    for s in range(cfg.steps + 2):
        t0 = time.perf_counter()
        toks.append(step(s))  # returns a Python int: the step has finished on the device
        if s >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return {"prefill_seconds": pre["seconds"], "prefill_peak_delta_mb": pre["peak_delta_mb"],
            "decode_step_seconds": statistics.median(times), "kv_bytes": kv_bytes,
            "decode_tokens": toks, **extra}


def _hybrid_ratios(variants: dict) -> None:
    base = variants.get("hf_sdpa", {})
    for r in variants.values():
        if "error" not in r:
            r["prefill_speedup"] = _ratio(base.get("prefill_seconds"), r["prefill_seconds"])
            r["decode_speedup"] = _ratio(base.get("decode_step_seconds"),
                                         r["decode_step_seconds"])
            r["kv_bytes_ratio"] = _ratio(r["kv_bytes"], base.get("kv_bytes"))


def hybrid_row(tokens: int, cfg, device, save, row: dict) -> None:
    side, _ = accel.TOKENS[tokens]
    folder = tempfile.mkdtemp(prefix=f"corelens-gpu-check-hybrid-{tokens}-")
    shared: dict = {}
    try:
        build_llava(folder, image_size=side * accel.PATCH, patch=accel.PATCH,
                    d_model=cfg.hybrid_d_model, layers=accel.LAYERS, heads=accel.HEADS,
                    kv_heads=accel.HEADS)
        mb = accel._batch(folder, tokens).to(device)
        row.update(seq_len=mb.seq_len, variants={})
        for v in HYBRID_VARIANTS:
            try:
                row["variants"][v] = hybrid_variant(folder, v, mb, shared, cfg, device)
            except Exception as err:
                row["variants"][v] = _error(err)
            save()
        _hybrid_ratios(row["variants"])
        toks = {v: r.get("decode_tokens") for v, r in row["variants"].items()}
        row["baselines_agree"] = toks.get("corelens_full") == toks.get("hf_sdpa")
    finally:
        shared.clear()
        _free()
        shutil.rmtree(folder, ignore_errors=True)


def hybrid_section(section: dict, cfg, device, save) -> None:
    section.update(model={"d_model": cfg.hybrid_d_model, "layers": accel.LAYERS,
                          "heads": accel.HEADS, "full_head_frac": accel.FRAC,
                          "n_sink": accel.N_SINK, "window": accel.WINDOW},
                   batch=cfg.batch, steps=cfg.steps, rows=[])
    for tokens in cfg.hybrid_tokens:
        row = {"tokens": tokens}
        section["rows"].append(row)
        try:
            hybrid_row(tokens, cfg, device, save, row)
        except Exception as err:
            row.update(_error(err))
        save()


# --- torchrun -------------------------------------------------------------------------------
def _max_diff(a, b) -> float:
    """max |a - b|, NaN == NaN (a score undefined in both), inf where only one is NaN."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs().masked_fill(a.isnan() & b.isnan(), 0)
    return float(d.nan_to_num(nan=math.inf).max()) if d.numel() else 0.0


def _score(folder: Path, data: Path, out: Path, device, ranks: int) -> dict:
    """``corelens score --metric all`` on ``ranks`` ranks (2: ``torch.distributed.run``, NCCL
    on CUDA, gloo on the CPU; 1: one plain process, i.e. ``score_all`` with a world of one)
    -> {score name: HeadScores}."""
    from corelens.scores.head_scores import HeadScores

    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [])
    cmd = [sys.executable, *launcher, "-m", "corelens", "score", "--model", str(folder),
           "--data", str(data), "--out", str(out), "--metric", "all", "--batch-size",
           str(TORCHRUN_BATCH), "--partial", str(out) + ".partial", "--threads", "1",
           "--no-progress"]
    if device.type == "cpu":
        cmd += ["--device", "cpu", "--backend", "gloo"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    return {k: HeadScores.from_dict(v) for k, v in json.loads(out.read_text()).items()}


def torchrun_section(section: dict, cfg, device, save) -> None:
    """Two ranks vs one process, the same command otherwise: the one-process run is the
    reference (the same score parameters as the CLI's, whatever they become)."""
    import torch
    from conftest import grounded_examples

    from corelens.data.loaders import save_jsonl
    from corelens.zoo.tiny import build_tiny

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        section["status"] = f"skipped: {torch.cuda.device_count()} GPU"
        return
    section.update(backend="gloo" if device.type == "cpu" else "nccl", ranks=2,
                   examples=TORCHRUN_EXAMPLES, batch_size=TORCHRUN_BATCH,
                   reference="the same corelens score command in one process (score_all)")
    folder = Path(tempfile.mkdtemp(prefix="corelens-gpu-check-torchrun-"))
    try:
        build_tiny("llava", folder, seed=0)
        data = save_jsonl(grounded_examples("llava", TORCHRUN_EXAMPLES), folder / "data.jsonl")
        t0 = time.perf_counter()
        got = _score(folder, data, folder / "ranks2.json", device, 2)
        section["seconds"] = round(time.perf_counter() - t0, 1)
        single = _score(folder, data, folder / "single.json", device, 1)
        diffs = {k: max(_max_diff(got[k].scores, hs.scores),
                        _max_diff(got[k].per_example, hs.per_example))
                 for k, hs in single.items() if k in got}
        section.update(status="ran", max_abs_diff=diffs,
                       scores_only_in_one=sorted(set(got) ^ set(single)),
                       equal=set(got) == set(single) and all(d == 0 for d in diffs.values()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- summary --------------------------------------------------------------------------------
def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _short(message: str) -> str:
    """An error's last line (the full text and traceback are in the JSON)."""
    lines = [line for line in message.splitlines() if line.strip()] or [""]
    return lines[-1][:200]


def _parity_lines(section: dict) -> list[str]:
    def cell(dtype: str, r: dict) -> str:
        if "error" in r:
            return f"{dtype} ERROR ({_short(r['error'])[:80]})"
        worst = max(r["max_abs_diff"].values())
        return (f"{dtype} {'ok' if r['ok'] else 'FAIL'} ({_fmt(worst)} / tol "
                f"{_fmt(r['tolerance'])})")

    return [f"parity {fam:16s} " + ("ERROR " + _short(e["error"]) if "error" in e else "  ".join(
        cell(dt, r) for dt, r in e.items() if isinstance(r, dict)))
        for fam, e in section.get("families", {}).items()]


def _ram_lines(section: dict) -> list[str]:
    lines = []
    for row in section.get("rows", []):
        r = row.get("ratios", {})
        runs = "  ".join(f"{v} {_fmt(row.get(v, {}).get('seconds'), '.4f')}s "
                         f"+{_fmt(row.get(v, {}).get('peak_delta_mb'), '.0f')}MB"
                         for v in ("hf_forward", "hf_forward_logits_to_keep", "corelens_ram"))
        lines += [f"ram {row['tokens']} tok (seq {row['seq_len']}): {runs}",
                  f"    RAM / forward: time x{_fmt(r.get('time_ram_over_forward'))}, mem "
                  f"x{_fmt(r.get('peak_mem_ram_over_forward'))}  |  RAM / logits_to_keep "
                  f"forward: time x{_fmt(r.get('time_ram_over_logits_to_keep'))}, mem "
                  f"x{_fmt(r.get('peak_mem_ram_over_logits_to_keep'))}"]
    return lines


def _hybrid_lines(section: dict) -> list[str]:
    def cell(v: str, r: dict) -> str:
        if "error" in r:
            return f"{v} ERROR"
        return (f"{v} prefill x{_fmt(r['prefill_speedup'])} decode x{_fmt(r['decode_speedup'])}"
                f" kv x{_fmt(r['kv_bytes_ratio'])}")

    return [f"hybrid {row['tokens']} tok (speed-up vs hf_sdpa): " + (
        "ERROR " + _short(row["error"]) if "error" in row
        else "  ".join(cell(v, r) for v, r in row.get("variants", {}).items()))
        for row in section.get("rows", [])]


def _torchrun_lines(section: dict) -> list[str]:
    line = f"torchrun: {section.get('status', '-')}"
    if "equal" in section:
        worst = max(section["max_abs_diff"].values(), default=0.0)
        line += (f" ({section['backend']}), equal to one process: {section['equal']} "
                 f"(max |diff| {_fmt(worst)})")
    return [line]


def summary(report: dict) -> list[str]:
    """The human summary: one line per family / token count / variant."""
    lines = [f"device: {report['device']} ({report['dtype']}); "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    per_section = {"parity": _parity_lines, "ram": _ram_lines, "hybrid": _hybrid_lines,
                   "torchrun": _torchrun_lines}
    for name, section in report["sections"].items():
        if "error" in section:
            lines.append(f"{name}: ERROR {_short(section['error'])}")
        lines += per_section[name](section)
    return lines


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(BENCH / "results" / "gpu_check.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--quick", action="store_true",
                    help="tiny widths, small token counts, 1 repeat (exercises every path)")
    ap.add_argument("--tokens", type=int, nargs="+", help="RAM section's vision token counts")
    ap.add_argument("--ram-side", type=int, help="RAM section: vision tokens per image side")
    ap.add_argument("--hybrid-tokens", type=int, nargs="+", choices=sorted(accel.TOKENS))
    for name in ("d_model", "heads", "layers", "vocab", "hybrid_d_model", "batch", "steps",
                 "repeats", "warmup"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    args = ap.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from corelens import compat

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here; --device cpu --quick exercises the code paths")
    args.torch_dtype = getattr(torch, args.dtype)
    settings = {k: getattr(args, k) for k in DEFAULTS}
    report = {"command": shlex.join(["python", *sys.argv]), "device": _device_name(device),
              "device_arg": args.device, "dtype": args.dtype, "quick": args.quick,
              "cuda_device_count": torch.cuda.device_count(), "versions": compat.versions(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": settings, "sections": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)

    run = {"parity": parity_section, "ram": ram_section, "hybrid": hybrid_section,
           "torchrun": torchrun_section}
    for name in args.sections:
        section = report["sections"][name] = {}
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            run[name](section, args, device, save)
        except Exception as err:  # recorded; the next section runs
            section.update(_error(err))
        section["section_seconds"] = round(time.perf_counter() - t0, 1)
        _free()
        save()
    print("\n".join(summary(report)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
