"""Batched head sweep vs one forward per head (activation patching of every head's output).

Pinned config: random LLaVA-shaped model (Llama decoder d_model 512, 8 layers, 8 heads = 64
heads), one image of 64 vision tokens per example, batch of 2 clean/corrupted pairs. Both
sweeps run in this process, side by side; the ratio is what counts. Each batched row is run
twice: reusing the target's image features across the stacked copies (the default) and
rerunning the vision tower per copy (``reuse_vision=False``), with and without ``resume`` (a
forward patching layer l starts from the unedited run's output of block l - 1), and with and
without ``replay`` + ``trim`` (layer l's attention replays its recorded z; the last block
computes the metric's rows only). The rows run ``interventions.core.sweep`` with
``patch_heads``'s jobs, so each shortcut can be turned off; the loop is one full forward per
head (``per_forward=1``, every shortcut off).

    python bench/patching.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads-per-forward", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch
    from PIL import Image

    from corelens import HookedMLLM
    from corelens.hook_names import act_name
    from corelens.interventions.core import cache_activations, sweep
    from corelens.interventions.patching import answer_logprob

    torch.set_num_threads(threads())
    folder = tempfile.mkdtemp(prefix="corelens-bench-patch-")
    build_llava(folder, image_size=64, patch=8)
    model = HookedMLLM.from_pretrained(folder)
    kw = dict(prompts=["what is the color ?"] * 2, answers=["red", "blue"])
    clean = model.prepare([Image.new("RGB", (64, 64), (200, 30, 30))] * 2, **kw)
    corrupt = model.prepare([Image.new("RGB", (64, 64), (30, 30, 200))] * 2, **kw)

    L, H = model.cfg.n_layers, model.cfg.n_heads

    def run(k: int, reuse: bool = True, resume: bool = True,
            replay: bool = True) -> tuple[float, torch.Tensor]:
        """``patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=k)``'s very
        steps, ``replay`` standing for both ``replay`` and ``trim``."""
        t = time.perf_counter()
        names = [act_name("z", l) for l in range(L)]
        src = cache_activations(model, clean, names)

        def job(l: int, h: int):
            def edit(x: torch.Tensor) -> None:
                x[:, :, h] = src[names[l]][:, :, h]
            return [(names[l], edit)]
        out = sweep(model, corrupt, answer_logprob, [job(l, h) for l in range(L)
                                                      for h in range(H)],
                    per_forward=k, reuse_vision=reuse, resume=resume, replay=replay,
                    trim=replay).mean(1).view(L, H)
        return time.perf_counter() - t, out

    run(args.heads_per_forward[0])  # warm-up
    loop_s, loop = run(1, resume=False, replay=False)  # the obvious loop: one full forward a head
    rows = []
    settings = [(1, True, True, True)] + [
        (k, reuse, resume, replay) for k in args.heads_per_forward
        for reuse, resume, replay in ((True, True, True), (True, True, False),
                                      (True, False, False), (False, False, False))]
    for k, reuse, resume, replay in settings:
        s, out = run(k, reuse, resume, replay)
        rows.append({"heads_per_forward": k, "reuse_vision": reuse, "resume": resume,
                     "replay_and_trim": replay,
                     "seconds": round(s, 3), "speedup_vs_loop": round(loop_s / s, 3),
                     "max_abs_diff_vs_loop": float((out - loop).abs().max())})
    report = {"n_heads": model.cfg.n_layers * model.cfg.n_heads, "seq_len": clean.seq_len,
              "loop_seconds": round(loop_s, 3), "batched": rows}
    print(json.dumps(report, indent=1) if args.json else report)


if __name__ == "__main__":
    main()
