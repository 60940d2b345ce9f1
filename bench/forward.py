"""The forward wrapper's cost: ``model(batch)`` of a HookedMLLM vs the HF model's own forward on
the same inputs (issue #17 item 3: <= 1.1x).

Models (``--models``): ``toy-llava`` (the shipped toy: 4 layers x 4 heads, d_model 128; a batch
of ``--examples`` zoo examples, 71 tokens), and ``llava-512`` (bench/common's random LLaVA:
d_model 512, 8 layers, 8 heads; one 24x24-token image, 587 tokens). Variants, all in this one
process on the same batch, timed in alternation (each round's order rotated), medians over the
rounds, by wall clock and by this process's CPU time:

- ``hf``: ``hf(**batch.inputs)``, a fresh HF copy of the weights with SDPA attention, as an HF
  user writes it (HF's default ``use_cache=True`` fills a KV cache nobody reads);
- ``hf_no_cache``: the same with ``use_cache=False``;
- ``corelens``: ``model(batch)`` (TransformerLens's bridge around the same HF modules, corelens's
  attention forward, no KV cache).

Logits are checked equal first (max |diff| printed). Ratios: corelens time / HF time.

    BENCH_THREADS=1 python bench/forward.py --repeats 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, threads  # noqa: E402


def _toy(n: int):
    from corelens import zoo

    model = zoo.load("toy-llava")
    return model, str(zoo.path("toy-llava")), model.prepare_examples(
        zoo.examples("toy-llava", n, seed=0))


def _llava_512():
    from PIL import Image

    from corelens import HookedMLLM

    folder = tempfile.mkdtemp(prefix="corelens-bench-forward-")
    build_llava(folder, image_size=24 * 16, patch=16)
    model = HookedMLLM.from_pretrained(folder)
    return model, folder, model.prepare([Image.new("RGB", (384, 384), (150, 90, 90))],
                                        ["what is the color ?"], answers=["red"])


def measure(name: str, examples: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    model, folder, batch = _toy(examples) if name == "toy-llava" else _llava_512()
    hf = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    inputs = dict(batch.inputs)
    calls = {"hf": lambda: hf(**inputs).logits,
             "hf_no_cache": lambda: hf(**inputs, use_cache=False).logits,
             "corelens": lambda: model(batch)}
    with torch.no_grad():
        ref = calls["hf"]()
        diff = {k: float((fn() - ref).abs().max()) for k, fn in calls.items()}  # warm-up
        wall: dict[str, list[float]] = {k: [] for k in calls}
        cpu: dict[str, list[float]] = {k: [] for k in calls}
        names = list(calls)
        for r in range(repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t, c = time.perf_counter(), time.process_time()
                calls[k]()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": name, "seq_len": batch.seq_len, "batch": len(batch), "repeats": repeats,
            "seconds": {k: round(v, 5) for k, v in med.items()},
            "cpu_seconds": {k: round(v, 5) for k, v in cmed.items()},
            "corelens_over_hf": round(med["corelens"] / med["hf"], 3),
            "corelens_over_hf_cpu": round(cmed["corelens"] / cmed["hf"], 3),
            "corelens_over_hf_no_cache_cpu": round(cmed["corelens"] / cmed["hf_no_cache"], 3),
            "max_abs_diff_vs_hf": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy-llava", "llava-512"],
                    choices=["toy-llava", "llava-512"])
    ap.add_argument("--examples", type=int, default=8, help="toy-llava batch size")
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(threads())
    rows = [measure(m, args.examples, args.repeats) for m in args.models]
    print(json.dumps({"threads": threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
