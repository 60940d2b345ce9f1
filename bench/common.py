"""Shared by the benchmarks: a pinned LLaVA-shaped model, isolated runs, peak-memory reading.

Each variant runs in its own subprocess so that its peak RSS is its own; ratios between
variants are measured side by side in one run (absolute times on a shared machine mean little).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable


def build_llava(folder: str, *, d_model: int = 512, layers: int = 8, heads: int = 8,
                kv_heads: int = 8, image_size: int = 32, patch: int = 8, **text_kw) -> None:
    """A random LLaVA: tiny 1-layer CLIP tower (``(image_size/patch)^2`` vision tokens per image),
    Llama decoder of the given shape (``text_kw``: more LlamaConfig fields, e.g. vocab_size);
    saved with an offline processor."""
    from corelens.zoo.tiny.llava import tiny_llava

    model, proc = tiny_llava(folder, d_model=d_model, layers=layers, heads=heads,
                             kv_heads=kv_heads, image_size=image_size, patch=patch,
                             center_crop=False, intermediate_size=int(d_model * 2.6875),
                             max_position_embeddings=32768, **text_kw)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB: ``VmHWM`` (peak RSS), ``VmRSS`` (RSS now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the peak measures only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """Peak RSS above the RSS before the first call (MB; measured on that call, before the
    allocator holds on to anything), then the median seconds of ``repeats`` more calls."""
    import gc

    gc.collect()
    if reset_peak():
        base = status_kb("VmRSS")
        fn()
        peak = status_kb("VmHWM")
    else:  # no reset: the process's all-time peak (an overestimate of the base)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "peak_rss_delta_mb": (peak - base) / 1024}


def run_isolated(script: str, *args: str) -> dict:
    """Run ``script --_variant ...`` in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "2"))
