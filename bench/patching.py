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

``--path``: every head's path effect (MLPs frozen) on the logits, and every head of the
layers before the last on the last layer's queries: ``path_patch_sets`` (the same sweep, one
per step) vs the loop a user writes with the two caches made once.

    python bench/patching.py --json
    python bench/patching.py --json --path
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
    ap.add_argument("--path", action="store_true",
                    help="also every head's path effect on the logits: path_patch_sets "
                    "vs one forward per head")
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
    if args.path:
        report["path_patching"] = path_rows(model, clean, corrupt, args.heads_per_forward)
    print(json.dumps(report, indent=1) if args.json else report)


def path_rows(model, clean, corrupt, per_forward: list[int]) -> dict:
    """Every head's path effect (MLPs frozen) on the logits, and every head of layers < L-1 on
    the last layer's queries: ``path_patch_sets`` vs the loop a user writes with the caches
    made once (per head one forward with every z and MLP output hooked -- the sender's z from
    the clean run, everything else the corrupted run's --, to the logits, or recording the
    receivers' inputs and then one more forward patching only those)."""
    import torch

    from corelens.interventions.patching import answer_logprob, path_patch_sets

    L, H = model.cfg.n_layers, model.cfg.n_heads
    z = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    mlps = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    q_last = f"blocks.{L - 1}.attn.hook_q"

    def loop(heads, to_queries: bool) -> torch.Tensor:
        with torch.no_grad():
            _, src = model.run_with_cache(clean, names_filter=z)
            _, tgt = model.run_with_cache(corrupt, names_filter=z + mlps)
            out = torch.zeros(len(heads))
            for i, (sl, sh) in enumerate(heads):
                def z_hook(x, hook, sl=sl, sh=sh):
                    x = tgt[hook.name].clone()
                    if hook.name == z[sl]:
                        x[:, :, sh] = src[hook.name][:, :, sh]
                    return x
                hooks = [(n, z_hook) for n in z] + [(n, lambda x, hook: tgt[hook.name])
                                                    for n in mlps]
                if to_queries:
                    seen = {}
                    model.run_with_hooks(corrupt, fwd_hooks=hooks + [
                        (q_last, lambda x, hook: seen.update(q=x.clone()))], return_type=None)
                    hooks = [(q_last, lambda x, hook: seen["q"])]
                logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
                out[i] = answer_logprob(logits, corrupt).mean()
        return out

    report = {}
    for to, heads, receivers in (
            ("logits", [(l, h) for l in range(L) for h in range(H)], "logits"),
            ("last_layer_queries", [(l, h) for l in range(L - 1) for h in range(H)],
             [(L - 1, h, "q") for h in range(H)])):
        t = time.perf_counter()
        ref = loop(heads, receivers != "logits")
        loop_s = time.perf_counter() - t
        rows = []
        for k in per_forward:
            t = time.perf_counter()
            got = path_patch_sets(model, clean, corrupt, answer_logprob, [[h] for h in heads],
                                  receivers, per_forward=k)
            s = time.perf_counter() - t
            rows.append({"per_forward": k, "seconds": round(s, 3),
                         "speedup_vs_loop": round(loop_s / s, 3),
                         "max_abs_diff_vs_loop": float((got - ref).abs().max())})
        report[to] = {"senders": len(heads), "loop_seconds": round(loop_s, 3), "sweep": rows}
    return report


if __name__ == "__main__":
    main()
