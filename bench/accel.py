"""Hybrid attention vs full attention vs FastV: prefill time, decode speed, KV bytes.

Pinned config: a random LLaVA (bench/common.py) whose Llama decoder has d_model 512, 8 layers,
8 heads — MHA, and the GQA variant with 2 KV heads — at 576, 2,304 and 8,192 vision tokens (16-px
patches; 8,192 = two 64x64-token images, as in bench/ram.py) and a short text prompt. Each variant
runs in its own subprocess; ratios are measured side by side in one run.

- ``hf_sdpa``: the plain HF model, SDPA attention, decoding on a preallocated ``StaticCache``
  (each step writes one slot in place) — the baseline of every ratio;
- ``hf_dynamic``: the same model decoding on HF's default ``DynamicCache``, reported beside it:
  every step ``torch.cat``s each layer's whole cache into a fresh tensor (at batch 8 and 8,192
  tokens ~2 GB of new memory per step: page faults + a full copy), so it costs far more than the
  bytes attention reads; an earlier version of this bench used it as the baseline, which
  inflated every decode ratio;
- ``corelens_full``: the HookedMLLM with its owned attention, no acceleration (bridge overhead),
  on the same preallocated cache;
- ``hybrid``: ``HybridAttention`` with 10% of the heads full (``ceil(0.1 * 64) = 7`` query
  heads), ``n_sink=4, window=64``. The model has random weights, so there are no CoRe heads to
  find: the full heads are a fixed seeded draw (``heads_draw(0)``). Under GQA the KV groups of
  those heads keep their full cache and the groups' other query heads stream over it. Speed
  depends on how many heads are full, not on which: ``hybrid_other_heads`` checks that;
- ``hybrid_whole_groups``: the same draw with every query head of its KV groups full (the rule
  before issue #17: under GQA 7 query heads made 6 groups = 24 query heads full);
- ``hybrid_kv_budget``: planned by KV group, ``HybridAttention.from_scores`` on seeded random
  scores (``scores_draw(0)``) with ``kv_budget=0.25`` (at most 4 of 16 GQA KV heads full) and
  ``frac=0.1`` (the 7 best query heads of those groups full);
- ``hybrid_other_heads``: another seeded draw at the same budgets (as many KV groups and full
  query heads as ``hybrid``). Which heads to keep decides accuracy, measured on a trained model
  with RAM-selected heads by ``bench/accel_toy.py`` (CoRe vs random heads);
- ``fastv``: K=2, R=50%, decoding on the same preallocated cache (its layers ``k..`` hold fewer
  tokens: a per-layer ``key_mask`` hides their unfilled slots).

Prefill: batch 1, the whole prompt, logits of the last position only, best of ``--repeats``.
Decode: the batch-1 prompt cache repeated to batch 8 (the hybrid's with room ``reserve``d for
the steps, the baseline's copied into a ``StaticCache`` of the prompt + steps), then greedy
steps (two warm-up steps, then the best of ``--steps``); ``decode_speedup`` = tokens/s ratio;
``decode_tokens`` (the first example's greedy tokens) lets the runs be checked against each
other: ``hf_sdpa``, ``hf_dynamic`` and ``corelens_full`` must agree (``baselines_agree``).
Best-of, not median: on a shared machine contention only ever adds time. Each measurement is
printed beside its ceiling: prefill from FLOPs (decoder + projector; the 1-layer
32-wide vision tower is left out), decode from bytes touched per step (weights, plus the KV cache
read by attention; plus the copy of the whole cache for the variants that grow it by
concatenation, ``hf_dynamic``: 3x the KV bytes) and from FLOPs.

    python bench/accel.py --json
    python bench/accel.py --json --interleaved --tokens 2304 --kv-heads 8   # decode only, A/B
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, run_isolated, threads, timed  # noqa: E402

TOKENS = {576: (24, 1), 2304: (48, 1), 8192: (64, 2)}  # tokens -> (grid side, images)
PATCH = 16
VARIANTS = ("hf_sdpa", "hf_dynamic", "corelens_full", "hybrid", "hybrid_whole_groups",
            "hybrid_kv_budget", "hybrid_other_heads", "fastv")
KV_TOUCH = {"hf_dynamic": 3}  # KV bytes touched per step / KV bytes (default 1)
FRAC, N_SINK, WINDOW, FASTV_K, FASTV_R = 0.1, 4, 64, 2, 0.5
KV_BUDGET = 0.25  # hybrid_kv_budget: at most this fraction of the KV heads full
D_MODEL, LAYERS, HEADS, FF = 512, 8, 8, int(512 * 2.6875)


def _batch(folder: str, tokens: int):
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from corelens.core.prepare import prepare
    from corelens.families import get_family

    side, n_img = TOKENS[tokens]
    px = side * PATCH

    class _Cfg:  # prepare reads only the config
        config = AutoConfig.from_pretrained(folder)

    imgs = [Image.new("RGB", (px, px), (100 + 50 * i, 90, 90)) for i in range(n_img)]
    return prepare(get_family("llava"), _Cfg(), AutoProcessor.from_pretrained(folder), [imgs],
                   ["describe the picture in detail please ."])


def heads_draw(seed: int = 0) -> list[tuple[int, int]]:
    import random

    pool = [(l, h) for l in range(LAYERS) for h in range(HEADS)]
    return sorted(random.Random(seed).sample(pool, math.ceil(FRAC * LAYERS * HEADS)))


def whole_groups(heads: list[tuple[int, int]], kv_heads: int) -> list[tuple[int, int]]:
    """Every query head of the KV groups of ``heads``: the rule before issue #17 (a full KV
    group's query heads all attended fully)."""
    rep = HEADS // kv_heads
    return sorted({(l, h // rep * rep + r) for l, h in heads for r in range(rep)})


def scores_draw(seed: int = 0):
    """Seeded random head scores [layer, head] (the model has no CoRe heads to find)."""
    import torch

    return torch.rand(LAYERS, HEADS, generator=torch.Generator().manual_seed(seed))


def _setup(folder: str, variant: str, mb, shared: dict | None = None, device=None, dtype=None):
    """(hf model, hybrid or None, fastv or None, prefill(use_cache)) of one variant; models in
    ``shared`` are reused (the interleaved run loads each model once). ``device`` / ``dtype``:
    where and in what the models load (None: the CPU and the checkpoint's dtype, as this
    bench runs); ``mb`` must already be on that device (``bench/gpu_check.py``)."""
    import torch

    shared = {} if shared is None else shared
    ids, kw = mb.input_ids, mb.model_kwargs()
    model = None
    if variant in ("hf_sdpa", "hf_dynamic"):
        from transformers import AutoModelForImageTextToText

        if "hf" not in shared:
            shared["hf"] = AutoModelForImageTextToText.from_pretrained(
                folder, attn_implementation="sdpa",
                **({} if dtype is None else {"dtype": dtype})).eval()
            if device is not None:
                shared["hf"] = shared["hf"].to(device)
        hf = shared["hf"]
    else:
        from corelens import HookedMLLM

        if "model" not in shared:
            shared["model"] = HookedMLLM.from_pretrained(folder, device=device, dtype=dtype)
        model = shared["model"]
        hf = model.hf_model
    from corelens.accel import FastV, HybridAttention

    hybrid = None
    kw = {"n_sink": N_SINK, "window": WINDOW}
    if variant == "hybrid":
        hybrid = HybridAttention(model, heads_draw(0), **kw)
    elif variant == "hybrid_whole_groups":
        n_kv = model.hf_model.config.get_text_config().num_key_value_heads
        hybrid = HybridAttention(model, whole_groups(heads_draw(0), n_kv), **kw)
    elif variant == "hybrid_kv_budget":
        hybrid = HybridAttention.from_scores(model, scores_draw(0), kv_budget=KV_BUDGET,
                                             frac=FRAC, **kw)
    elif variant == "hybrid_other_heads":
        core = HybridAttention(model, heads_draw(0))
        hybrid = HybridAttention.random(model, len(core.full_kv_heads), seed=1,
                                        n_heads=len(core.full_heads), **kw)
    fastv = FastV(model, k=FASTV_K, ratio=FASTV_R) if variant == "fastv" else None

    def prefill(use_cache: bool = False):
        with torch.no_grad():
            if hybrid is not None:
                return hybrid.prefill(mb) if use_cache else _hybrid_forward(hybrid, mb)
            if fastv is not None:
                with fastv.attach(mb):
                    return hf(input_ids=ids, **kw, use_cache=use_cache, logits_to_keep=1)
            return hf(input_ids=ids, **kw, use_cache=use_cache, logits_to_keep=1)

    return hf, hybrid, fastv, prefill


def _decoder(variant: str, hf, hybrid, prefill, mb, steps: int, batch: int, attention=None):
    """Prefill with a cache, repeat it to ``batch``; returns (step(s) -> next token of example
    0, KV bytes of the batch-1 prompt cache, first token, extras)."""
    import torch

    from corelens.accel import cache_nbytes

    extra: dict = {}
    lens: list[int] = []
    res = prefill(use_cache=True)
    if hybrid is not None:
        logits, cache, _ = res
        extra["full_kv_heads"] = len(hybrid.full_kv_heads)
        extra["full_heads"] = len(hybrid.full_heads)
        extra["kv_budget"] = hybrid.kv_budget
    else:
        logits, cache = res.logits[:, -1], res.past_key_values
    kv_bytes = cache_nbytes(cache)
    if hybrid is not None:
        cache = cache.repeat(batch)
        cache.reserve(steps + 2)
    elif variant in ("hf_sdpa", "corelens_full", "fastv"):  # preallocated: one slot per step
        from transformers import StaticCache

        max_len = mb.seq_len + steps + 2
        static = StaticCache(config=hf.config, max_cache_len=max_len)
        for layer, dyn in enumerate(cache.layers):
            static.update(dyn.keys.repeat_interleave(batch, 0),
                          dyn.values.repeat_interleave(batch, 0), layer)
            lens.append(dyn.keys.shape[2])
        cache = static
    else:
        cache.batch_repeat_interleave(batch)
    tok = logits.argmax(-1).repeat(batch)
    pos = (mb.model_kwargs()["position_ids"][:, -1] + 1).repeat(batch)
    first = int(tok[0])

    def step(s: int) -> int:
        nonlocal tok
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for layer, n in enumerate(lens):  # FastV's shorter layers: their filled slots only
                if n < lens[0]:
                    ok = torch.zeros(1, 1, 1, max_len, dtype=torch.bool)
                    ok[..., :n + s + 1] = True
                    stack.enter_context(attention.key_mask(layer, ok))
            if hybrid is not None:
                lg = hybrid.decode_step(tok, pos + s, cache)
            else:
                lg = hf(input_ids=tok[:, None], position_ids=(pos + s)[:, None],
                        past_key_values=cache, use_cache=True).logits[:, -1]
        tok = lg.argmax(-1)
        return int(tok[0])

    return step, kv_bytes, first, extra


def run_variant(folder: str, variant: str, tokens: int, repeats: int, steps: int,
                batch: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    mb = _batch(folder, tokens)
    out: dict = {"seq_len": mb.seq_len}
    shared: dict = {}
    hf, hybrid, fastv, prefill = _setup(folder, variant, mb, shared)

    # --- prefill, batch 1 ---
    out["prefill"] = timed(prefill, 1)  # peak RSS of the first call, then one timed call
    times = [out["prefill"]["seconds"]]
    for _ in range(repeats - 1):  # best of `repeats`: on a shared machine contention only adds
        t0 = time.perf_counter()
        prefill()
        times.append(time.perf_counter() - t0)
    out["prefill"]["seconds"] = min(times)

    # --- decode, batch `batch` from the repeated batch-1 prompt cache ---
    step, out["kv_bytes"], first, extra = _decoder(variant, hf, hybrid, prefill, mb, steps,
                                                   batch, _attention(shared))
    out.update(extra)
    times, toks = [], [first]
    for s in range(steps + 2):
        t0 = time.perf_counter()
        toks.append(step(s))
        if s >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    out["decode_tokens"] = toks
    out["decode_step_seconds"] = min(times)
    out["decode_step_seconds_median"] = statistics.median(times)
    out["decode_tokens_per_s"] = batch / out["decode_step_seconds"]
    return out


def run_interleaved(folder: str, variants: list[str], tokens: int, steps: int,
                    batch: int) -> dict:
    """Decode only, all variants in one process, their steps interleaved (step s of every
    variant, then step s + 1, ...): contention on a shared machine hits them alike. Per
    variant: best and median step seconds, and the ratios to ``hf_sdpa`` of both."""
    import torch

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    mb = _batch(folder, tokens)
    shared: dict = {}
    order = ["hf_sdpa"] + [v for v in variants if v != "hf_sdpa"]
    steppers, times, toks = {}, {}, {}
    for v in order:
        hf, hybrid, _, prefill = _setup(folder, v, mb, shared)
        steppers[v], _, first, _ = _decoder(v, hf, hybrid, prefill, mb, steps, batch,
                                            _attention(shared))
        times[v], toks[v] = [], [first]
    for s in range(steps + 2):
        for v in order:
            t0 = time.perf_counter()
            toks[v].append(steppers[v](s))
            if s >= 2:
                times[v].append(time.perf_counter() - t0)
    base_best, base_med = min(times["hf_sdpa"]), statistics.median(times["hf_sdpa"])
    return {v: {"step_seconds_best": round(min(t), 5),
                "step_seconds_median": round(statistics.median(t), 5),
                "decode_speedup_best": round(base_best / min(t), 3),
                "decode_speedup_median": round(base_med / statistics.median(t), 3),
                "decode_tokens": toks[v]} for v, t in times.items()}


def _attention(shared: dict):
    """The HookedMLLM's attention backend (None when only the plain HF model is loaded)."""
    model = shared.get("model")
    return None if model is None else model.attention


def _hybrid_forward(hybrid, mb):
    ids, kw = hybrid.model._inputs(mb)
    with hybrid.attach(mb):
        return hybrid.model.hf_model(input_ids=ids, **kw, use_cache=False, logits_to_keep=1)


# --- ceilings ---------------------------------------------------------------------------------
def _layout(folder: str, tokens: int):
    mb = _batch(folder, tokens)
    return mb.layout.vision_mask()[0], mb.seq_len


def _stream_keys(vision, t: int) -> int:
    """Keys a streaming head scores over the whole prompt (ideal: no band padding)."""
    import torch

    valid = torch.ones(t, dtype=torch.bool)
    rank = torch.arange(t)
    glob = valid & (~vision | (rank < N_SINK))
    i = torch.arange(t)
    window = torch.minimum(i, torch.tensor(WINDOW)) + 1
    # globals strictly older than the window of row i
    cum = torch.cumsum(glob.long(), 0)
    older = torch.where(i - WINDOW - 1 >= 0, cum[(i - WINDOW - 1).clamp(min=0)], 0)
    return int((window + older).sum())


def ceilings(folder: str, tokens: int, kv_heads: int, variant: str, full_q: int | None,
             batch: int, kv_len: dict) -> dict:
    vision, t = _layout(folder, tokens)
    d, dh = D_MODEL, D_MODEL // HEADS
    kvd = kv_heads * dh
    n_rep = HEADS // kv_heads
    params_layer = 2 * d * d + 2 * d * kvd + 3 * d * FF
    n_vis = int(vision.sum())
    proj = 2 * n_vis * (32 * d + d * d)

    def linear(n: int) -> float:
        return 2 * n * params_layer

    causal = t * (t + 1) / 2
    full_layer = linear(t) + HEADS * 4 * dh * causal
    full = LAYERS * full_layer + proj
    if variant in ("hf_sdpa", "hf_dynamic", "corelens_full"):
        var = full
    elif variant == "fastv":
        t2 = t - int(n_vis * FASTV_R)
        var = FASTV_K * full_layer + (LAYERS - FASTV_K) * (
            linear(t2) + HEADS * 4 * dh * t2 * (t2 + 1) / 2) + proj
    else:
        fq = full_q  # full query heads over all layers
        sq = LAYERS * HEADS - fq
        var = LAYERS * linear(t) + proj + 4 * dh * (fq * causal + sq * _stream_keys(vision, t))
    # decode, per step at `batch`: bytes = weights + the KV cache read by attention (1x the KV
    # bytes; 3x for a cache grown by concatenation: read + write of the copy); FLOPs = weights
    # + attention
    w_bytes = 4 * (LAYERS * params_layer)
    kv_full = KV_TOUCH.get("hf_sdpa", 1) * batch * kv_len["hf_sdpa"]
    kv_var = KV_TOUCH.get(variant, 1) * batch * kv_len[variant]
    attn_full = 2 * batch * kv_len["hf_sdpa"] / 4 * n_rep  # 2 FLOPs per key element per q head
    attn_var = 2 * batch * kv_len[variant] / 4 * n_rep
    dec_w_flops = 2 * batch * LAYERS * params_layer
    return {
        "prefill_ceiling_flops": round(full / var, 3),
        "decode_ceiling_bytes": round((w_bytes + kv_full) / (w_bytes + kv_var), 3),
        "decode_ceiling_flops": round((dec_w_flops + attn_full) / (dec_w_flops + attn_var), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[576, 2304, 8192])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--interleaved", action="store_true",
                    help="decode only: every variant's steps interleaved in one process")
    ap.add_argument("--_variant")
    ap.add_argument("--_interleaved", action="store_true")
    ap.add_argument("--_folder")
    args = ap.parse_args()
    if args._interleaved:
        print(json.dumps(run_interleaved(args._folder, args.variants, args.tokens[0],
                                         args.steps, args.batch)))
        return
    if args._variant:
        print(json.dumps(run_variant(args._folder, args._variant, args.tokens[0], args.repeats,
                                     args.steps, args.batch)))
        return
    results = []
    for kv_heads in args.kv_heads:
        for tokens in args.tokens:
            side, _ = TOKENS[tokens]
            folder = tempfile.mkdtemp(prefix=f"corelens-bench-accel-{kv_heads}-{tokens}-")
            build_llava(folder, image_size=side * PATCH, patch=PATCH, kv_heads=kv_heads)
            if args.interleaved:
                # hf_dynamic allocates and frees the whole cache every step, which slows
                # whichever variant runs next: it is measured in the isolated runs only
                inter = [v for v in args.variants if v != "hf_dynamic"]
                res = run_isolated(__file__, "--_interleaved", "--_folder", folder,
                                   "--tokens", str(tokens), "--steps", str(args.steps),
                                   "--batch", str(args.batch), "--variants", *inter)
                results.append({"config": "MHA" if kv_heads == HEADS else
                                f"GQA ({kv_heads} KV heads)", "tokens": tokens,
                                "interleaved_decode": res})
                if not args.json:
                    for v, e in res.items():
                        print(f"  {v:14s} decode x{e['decode_speedup_best']:.2f} (median "
                              f"x{e['decode_speedup_median']:.2f})")
                continue
            rows = {}
            for v in args.variants:
                rows[v] = run_isolated(__file__, "--_variant", v, "--_folder", folder,
                                       "--tokens", str(tokens), "--repeats", str(args.repeats),
                                       "--steps", str(args.steps), "--batch", str(args.batch))
                if not args.json:
                    print(f"  {v}: {rows[v]}", file=sys.stderr)
            base = rows["hf_sdpa"]
            kv_len = {v: r["kv_bytes"] for v, r in rows.items()}
            entry = {"config": "MHA" if kv_heads == HEADS else f"GQA ({kv_heads} KV heads)",
                     "tokens": tokens, "seq_len": base["seq_len"], "variants": {}}
            for v, r in rows.items():
                e = {
                    "tokens": tokens,
                    "prefill_speedup": round(base["prefill"]["seconds"] / r["prefill"]["seconds"],
                                             3),
                    "decode_speedup": round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                                            3),
                    "kv_bytes_ratio": round(r["kv_bytes"] / base["kv_bytes"], 4),
                    "prefill_seconds": round(r["prefill"]["seconds"], 4),
                    "prefill_peak_rss_delta_mb": round(r["prefill"]["peak_rss_delta_mb"], 1),
                    "decode_tokens_per_s": round(r["decode_tokens_per_s"], 2),
                    "kv_bytes": r["kv_bytes"],
                    "decode_tokens": r["decode_tokens"],
                }
                if "kv_budget" in r:
                    e["full_kv_heads"] = r["full_kv_heads"]
                    e["full_heads"] = r["full_heads"]
                    e["kv_budget"] = round(r["kv_budget"], 4)
                e.update(ceilings(folder, tokens, kv_heads, v, r.get("full_heads"),
                                  args.batch, kv_len))
                entry["variants"][v] = e
            same = {v: rows[v]["decode_tokens"] for v in ("hf_dynamic", "corelens_full")
                    if v in rows}
            entry["baselines_agree"] = all(t == base["decode_tokens"] for t in same.values())
            results.append(entry)
            if not args.json:
                print(f"{entry['config']} tokens={tokens} seq={entry['seq_len']}")
                for v, e in entry["variants"].items():
                    print(f"  {v:14s} prefill x{e['prefill_speedup']:.2f} (ceil "
                          f"x{e['prefill_ceiling_flops']:.2f})  decode x{e['decode_speedup']:.2f}"
                          f" (ceil bytes x{e['decode_ceiling_bytes']:.2f}, flops "
                          f"x{e['decode_ceiling_flops']:.2f})  kv x{e['kv_bytes_ratio']:.3f}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
