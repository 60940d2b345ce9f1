"""RAM scoring cost vs the plain HF forward, and vs the TransformerLens way.

Pinned config: a random LLaVA-shaped model (Llama decoder d_model 512, 8 layers, 8 heads; a
1-layer CLIP tower with 16-px patches) at 576, 2,304 and 8,192 vision tokens (8,192 = two
64x64-token images). One grounded example with a 3-token answer. Variants, each in its own
process:

- ``hf_forward``: the plain HF model's forward (SDPA attention, no hooks) — the baseline;
- ``hf_forward_answer_logits``: the same with ``logits_to_keep`` = the answer positions (HF's
  own knob): the forward a user who needs only the answer's logits runs;
- ``corelens_ram``: what ``score_all`` runs per batch: a HookedMLLM forward with ``RamMetric``
  attached (rows for the 3 query positions only; SDPA everywhere; no logits are read, so the
  unembedding runs on one position);
- ``tl_cache``: the TransformerLens way as the tutorials write it — a bridge built by
  TransformerLens, ``run_with_cache`` of every ``hook_pattern``, then the same reduction;
- ``tl_hook_reduce``: the TransformerLens way as a careful user writes it — the same bridge,
  ``run_with_hooks`` with a forward hook on each layer's ``hook_pattern`` that reduces it to
  the RAM rows at once and keeps nothing else, so no more than one layer's pattern is alive
  (the bridge's attention is eager either way: that cost is TransformerLens's).

The RAM values of both TL variants are checked against ``corelens_ram`` (max |diff| reported,
asserted < 1e-5). ``tl_cache`` is skipped above ``--tl-max-tokens`` (default 4,096; at 8,192 its
peak measured +19.4 GB); its memory ratio is then a lower bound: the cached patterns alone,
layers * heads * T^2 * 4 bytes, over the RAM run's measured peak.

    python bench/ram.py --json
    python bench/ram.py --json --tokens 8192 --variants corelens_ram tl_hook_reduce
    # throughput only, the forwards and RAM timed in alternation in one process (steadier)
    python bench/ram.py --interleaved --tokens 576 2304 --variants hf_forward corelens_ram
    # peak memory without glibc's moving mmap threshold (same MB run after run)
    MALLOC_MMAP_THRESHOLD_=65536 python bench/ram.py --tokens 2304 8192 --repeats 1 \
        --variants hf_forward corelens_ram
    # real width and vocabulary (LLaVA-1.5-7B's 4096 / 32 heads / 32,000 tokens, 2 layers)
    python bench/ram.py --tokens 4096 --d-model 4096 --heads 32 --layers 2 --vocab 32000 \
        --variants hf_forward hf_forward_answer_logits corelens_ram
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, run_isolated, threads, timed  # noqa: E402

TOKENS = {576: (24, 1), 2304: (48, 1), 4096: (64, 1), 8192: (64, 2)}  # -> (grid side, images)
PATCH = 16


def _batch_inputs(folder: str, tokens: int):
    from PIL import Image
    from transformers import AutoProcessor

    from corelens.core.prepare import prepare
    from corelens.families import get_family

    side, n_img = TOKENS[tokens]
    px = side * PATCH
    proc = AutoProcessor.from_pretrained(folder)

    class _Cfg:  # prepare reads only the config
        pass

    from transformers import AutoConfig

    hf = _Cfg()
    hf.config = AutoConfig.from_pretrained(folder)
    imgs = [Image.new("RGB", (px, px), (100 + 50 * i, 90, 90)) for i in range(n_img)]
    return prepare(get_family("llava"), hf, proc, [imgs], ["what is the color ?"],
                   answers=["red blue green"], boxes=[[(0, (0, 0, px // 4, px // 4))]])


def _setup(folder: str, variant: str, batch: Any) -> tuple[Callable[[], None], dict]:
    """The variant's call on ``batch`` and the dict it writes its RAM values to ("ram")."""
    import torch

    ids, kw = batch.input_ids, batch.model_kwargs()
    ev = batch.evidence_positions(0)
    q = batch.query_positions[0]
    result = {}
    if variant in ("hf_forward", "hf_forward_answer_logits"):
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
        keep = {"logits_to_keep": batch.logits_to_keep} if variant.endswith("logits") else {}

        def fn():
            with torch.no_grad():
                return hf(input_ids=ids, **kw, **keep).logits
    elif variant == "corelens_ram":
        from corelens import HookedMLLM
        from corelens.scores.ram import RamMetric

        model = HookedMLLM.from_pretrained(folder)
        metric = RamMetric(model)

        def fn():
            with torch.no_grad(), metric.attach(batch):
                model(batch, return_type=None)  # as score_all: no logits are read
            result["ram"] = metric.example_level()["ram"][0]
    elif variant in ("tl_cache", "tl_hook_reduce"):
        from functools import partial

        from transformers import AutoModelForImageTextToText, AutoProcessor

        from corelens.compat import build_bridge_from_module  # TL private builder, wrapped

        hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
        bridge = build_bridge_from_module(hf, "LlavaForConditionalGeneration", hf_config=hf.config,
                                          tokenizer=AutoProcessor.from_pretrained(folder).tokenizer)
        n_layers = hf.config.text_config.num_hidden_layers

        def reduce(pattern):  # [batch, head, q, k] -> RAM per head
            return pattern[0][:, q][..., ev].sum(-1).mean(-1)

        if variant == "tl_cache":
            def fn():
                with torch.no_grad():
                    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith(
                        "hook_pattern") and n.startswith("blocks."), **kw)
                    result["ram"] = torch.stack([
                        reduce(cache[f"blocks.{l}.attn.hook_pattern"]) for l in range(n_layers)])
        else:
            rows: list = [None] * n_layers

            def reduce_hook(pattern, hook, layer):
                rows[layer] = reduce(pattern)  # keep 3 x |evidence| entries, not the pattern
                # returning None leaves the activation as it is

            hooks = [(f"blocks.{l}.attn.hook_pattern", partial(reduce_hook, layer=l))
                     for l in range(n_layers)]

            def fn():
                with torch.no_grad():
                    bridge.run_with_hooks(ids, fwd_hooks=hooks, **kw)
                result["ram"] = torch.stack(rows)
    else:
        raise ValueError(variant)
    return fn, result


def run_variant(folder: str, variant: str, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    batch = _batch_inputs(folder, tokens)
    fn, result = _setup(folder, variant, batch)
    out = timed(fn, repeats)
    out["seq_len"] = batch.seq_len
    if "ram" in result:
        out["ram"] = result["ram"].tolist()
    return out


def run_interleaved(folder: str, variants: list[str], tokens: int, repeats: int) -> dict:
    """Throughput only: the variants in this one process, timed in alternation (round r runs
    them all, its order rotated by r), so drift and other jobs' load hit them alike; each round
    gives a paired ratio of each variant's time to ``corelens_ram``'s. No peak memory here."""
    import torch

    torch.set_num_threads(threads())
    batch = _batch_inputs(folder, tokens)
    calls = {v: _setup(folder, v, batch)[0] for v in variants}
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            t = time.perf_counter()
            calls[v]()
            times[v].append(time.perf_counter() - t)
    out = {"tokens": tokens, "seq_len": batch.seq_len, "mode": "interleaved",
           "repeats": repeats, "threads": threads()}
    for v in variants:
        per_round = [a / b for a, b in zip(times[v], times["corelens_ram"])]
        out[v] = {"seconds_median": round(statistics.median(times[v]), 4),
                  "throughput_ratio_ram_vs_this_median": round(statistics.median(per_round), 3),
                  "throughput_ratio_ram_vs_this_min_max": [round(min(per_round), 3),
                                                           round(max(per_round), 3)]}
    return out


VARIANTS = ("hf_forward", "hf_forward_answer_logits", "corelens_ram", "tl_cache",
            "tl_hook_reduce")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[576, 2304, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="corelens_ram always runs (every ratio is to it or from it)")
    ap.add_argument("--tl-max-tokens", type=int, default=4096,
                    help="skip tl_cache above this many tokens (its cached patterns need "
                    "layers * heads * T^2 * 4 bytes: 17 GB at 8,192, +19.4 GB peak measured); "
                    "tl_hook_reduce always runs")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: the toy tokenizer's, 71 tokens)")
    ap.add_argument("--interleaved", action="store_true",
                    help="throughput only: hf_forward, hf_forward_answer_logits (if asked) and "
                    "corelens_ram in one process, timed in alternation (no peak memory)")
    ap.add_argument("--_variant")
    ap.add_argument("--_interleaved", action="store_true")
    ap.add_argument("--_folder")
    args = ap.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args._folder, args._variant, args.tokens[0], args.repeats)))
        return
    if args._interleaved:
        print(json.dumps(run_interleaved(args._folder, args.variants, args.tokens[0],
                                         args.repeats)))
        return
    import torch

    shape = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
             "vocab": args.vocab}
    report = {"model": shape, "tokens": [], "throughput_ratio_vs_forward": [],
              "peak_mem_ratio_vs_forward": [], "throughput_ratio_vs_answer_logits_forward": [],
              "peak_mem_ratio_vs_answer_logits_forward": [],
              "peak_mem_ratio_cache_baseline_vs_ram": [], "max_abs_ram_diff_vs_tl": [],
              "peak_mem_ratio_hook_reduce_vs_ram": [], "max_abs_ram_diff_vs_tl_hook_reduce": [],
              "time_ratio_cache_baseline_vs_ram": [], "time_ratio_hook_reduce_vs_ram": [],
              "rows": []}

    def ratio(a: float, b: float) -> float:
        return round(a / max(b, 1e-9), 3)

    interleaved = []
    for tokens in args.tokens:
        side, _ = TOKENS[tokens]
        folder = tempfile.mkdtemp(prefix=f"corelens-bench-ram-{tokens}-")
        extra = {"vocab_size": args.vocab} if args.vocab else {}
        build_llava(folder, image_size=side * PATCH, patch=PATCH, d_model=args.d_model,
                    layers=args.layers, heads=args.heads, kv_heads=args.heads, **extra)
        if args.interleaved:
            forwards = [v for v in VARIANTS[:2] if v in args.variants] or ["hf_forward"]
            interleaved.append(run_isolated(
                __file__, "--_interleaved", "--_folder", folder, "--tokens", str(tokens),
                "--repeats", str(args.repeats), "--variants", *forwards, "corelens_ram"))
            if not args.json:
                print(json.dumps(interleaved[-1]))
            continue
        rows = {}
        variants = [v for v in VARIANTS if v in args.variants or v == "corelens_ram"]
        if tokens > args.tl_max_tokens and "tl_cache" in variants:
            variants.remove("tl_cache")
        for v in variants:
            rows[v] = run_isolated(__file__, "--_variant", v, "--_folder", folder,
                                   "--tokens", str(tokens), "--repeats", str(args.repeats))
        ram = rows["corelens_ram"]
        base = rows.get("hf_forward")
        report["tokens"].append(tokens)
        report["throughput_ratio_vs_forward"].append(
            ratio(base["seconds"], ram["seconds"]) if base else None)
        report["peak_mem_ratio_vs_forward"].append(
            ratio(ram["peak_rss_delta_mb"], base["peak_rss_delta_mb"]) if base else None)
        lean = rows.get("hf_forward_answer_logits")
        report["throughput_ratio_vs_answer_logits_forward"].append(
            ratio(lean["seconds"], ram["seconds"]) if lean else None)
        report["peak_mem_ratio_vs_answer_logits_forward"].append(
            ratio(ram["peak_rss_delta_mb"], lean["peak_rss_delta_mb"]) if lean else None)
        for v, mem_key, diff_key, time_key in (
                ("tl_cache", "peak_mem_ratio_cache_baseline_vs_ram", "max_abs_ram_diff_vs_tl",
                 "time_ratio_cache_baseline_vs_ram"),
                ("tl_hook_reduce", "peak_mem_ratio_hook_reduce_vs_ram",
                 "max_abs_ram_diff_vs_tl_hook_reduce", "time_ratio_hook_reduce_vs_ram")):
            tl = rows.get(v)
            if tl is not None:
                diff = float((torch.tensor(ram["ram"]) - torch.tensor(tl["ram"])).abs().max())
                assert diff < 1e-5, f"{v} computes other RAM values (max |diff| {diff})"
                report[mem_key].append(ratio(tl["peak_rss_delta_mb"], ram["peak_rss_delta_mb"]))
                report[diff_key].append(diff)
                report[time_key].append(ratio(tl["seconds"], ram["seconds"]))
            elif v == "tl_cache" and v in args.variants:
                # not run: a lower bound is its cached patterns alone over RAM's measured peak
                patterns_mb = args.layers * args.heads * ram["seq_len"] ** 2 * 4 / 2**20
                report[mem_key].append(
                    f">= {patterns_mb / max(ram['peak_rss_delta_mb'], 1e-9):.1f} (not run: "
                    f"{args.layers}*{args.heads}*{ram['seq_len']}^2*4 B = {patterns_mb:.0f} MB "
                    "of cached "
                    f"patterns / RAM's peak {ram['peak_rss_delta_mb']:.0f} MB)")
                report[diff_key].append(None)
                report[time_key].append(None)
            else:
                for key in (mem_key, diff_key, time_key):
                    report[key].append(None)
        report["rows"].append({"tokens": tokens, **{k: {kk: vv for kk, vv in r.items()
                                                         if kk != "ram"}
                                                     for k, r in rows.items()}})
        if not args.json:
            print(f"tokens={tokens} seq={ram['seq_len']}: " + "  ".join(
                f"{k} {r['seconds']:.3f}s +{r['peak_rss_delta_mb']:.0f}MB"
                for k, r in rows.items()))
            print(f"  max |RAM diff| vs tl_cache {report['max_abs_ram_diff_vs_tl'][-1]}, "
                  f"vs tl_hook_reduce {report['max_abs_ram_diff_vs_tl_hook_reduce'][-1]}")
    if args.interleaved:
        report = {"model": shape, "interleaved": interleaved}
    print(json.dumps(report, indent=1 if args.json else None))


if __name__ == "__main__":
    main()
