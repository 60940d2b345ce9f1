"""Decoder forward cost: HF SDPA vs TransformerLens's eager bridge vs corelens's owned attention.

Pinned config: a LLaVA whose Llama decoder has d_model 512, 8 layers, 8 heads; a prompt of
``--tokens`` tokens (text-only: the decoder cost is what differs between the variants). Each
variant runs in its own subprocess so its peak RSS is its own. Ratios are measured side by side
in one run; absolute times on a shared machine mean little.

``--interleaved``: the variants share one process and run in alternation, round after round
(order rotated each round), so drift and other jobs' load hit them alike; it prints the median
and min/max over rounds of each variant's time and of its per-round ratio to HF SDPA (no peak
memory: the process is shared).

    python bench/attention.py --tokens 2304 --json
    python bench/attention.py --tokens 2304 --interleaved --repeats 9
    python bench/attention.py --tokens 2304 --profile --repeats 3

``--profile``: HF SDPA and corelens SDPA under ``torch.profiler`` (alternating), the ops that
take their time per forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_llava, run_isolated, threads, timed  # noqa: E402

VARIANTS = ("hf_sdpa", "bridge_eager", "corelens_sdpa", "corelens_eager")


def _setup(folder: str, variant: str, tokens: int):
    """The variant's model, built once; returns a forward on the pinned prompt (-> logits)."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(20, 60, (1, tokens))
    mask = torch.ones_like(ids)
    pos = torch.arange(tokens)[None]
    if variant == "hf_sdpa":
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            folder, attn_implementation="sdpa").eval()

        def fwd():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    elif variant == "bridge_eager":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from corelens.compat import build_bridge_from_module  # TL private builder, wrapped

        hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
        proc = AutoProcessor.from_pretrained(folder)
        bridge = build_bridge_from_module(hf, "LlavaForConditionalGeneration",
                                          hf_config=hf.config, tokenizer=proc.tokenizer)

        def fwd():
            return bridge(ids, attention_mask=mask, position_ids=pos)
    elif variant in ("corelens_sdpa", "corelens_eager"):
        from corelens import HookedMLLM

        model = HookedMLLM.from_pretrained(folder)
        model.attention.mode = variant.split("_")[1]

        def fwd():
            return model.bridge(ids, attention_mask=mask, position_ids=pos)
    else:
        raise ValueError(variant)
    return fwd


def run_variant(folder: str, variant: str, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    fwd = _setup(folder, variant, tokens)
    out = {}

    def run():
        with torch.no_grad():
            out["logits"] = fwd()

    result = timed(run, repeats)
    result["logits_sum"] = float(out["logits"].float().sum())
    return result


def run_interleaved(folder: str, tokens: int, repeats: int) -> dict:
    """Every variant in this one process, timed in alternation: round r runs them all, its order
    rotated by r so none is always first. Drift and other jobs' load hit every variant alike;
    each round gives a paired ratio to HF SDPA. No peak memory here (the process is shared)."""
    import statistics
    import time

    import torch

    torch.set_num_threads(threads())
    fwds = {v: _setup(folder, v, tokens) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        ref = fwds["hf_sdpa"]().float()
        diffs = {v: float((fwds[v]().float() - ref).abs().max()) for v in VARIANTS}  # warm-up
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for v in order:
                t = time.perf_counter()
                fwds[v]()
                times[v].append(time.perf_counter() - t)
    out = {"tokens": tokens, "mode": "interleaved", "repeats": repeats, "threads": threads()}
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(times[v], times["hf_sdpa"])]
        out[v] = {
            "seconds_median": round(statistics.median(times[v]), 4),
            "seconds_min_max": [round(min(times[v]), 4), round(max(times[v]), 4)],
            "time_vs_hf_sdpa_median": round(statistics.median(ratios), 3),
            "time_vs_hf_sdpa_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "logits_max_abs_diff_vs_hf": diffs[v],
        }
    return out


def run_profile(folder: str, tokens: int, repeats: int, top: int = 10) -> dict:
    """HF SDPA and corelens SDPA under ``torch.profiler``, one forward each per round, in
    alternation: self CPU milliseconds per forward of their costliest ops (which SDPA kernel each
    reaches, what one does that the other does not)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads())
    names = ("hf_sdpa", "corelens_sdpa")
    fwds = {v: _setup(folder, v, tokens) for v in names}
    ops: dict[str, dict[str, list[float]]] = {v: {} for v in names}  # op -> [count, self us]
    sdpa_args: dict[str, set] = {v: set() for v in names}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):  # what each variant hands SDPA: a mask? is_causal?
        mask = kw.get("attn_mask", a[3] if len(a) > 3 else None)
        causal = kw.get("is_causal", a[5] if len(a) > 5 else False)
        sdpa_args[current].add((mask is None, bool(causal)))
        return sdpa(*a, **kw)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            for current in names:
                fwds[current]()  # warm-up
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        for _ in range(repeats):
            for v in names:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fwds[v]()
                for e in prof.key_averages():
                    acc = ops[v].setdefault(e.key, [0, 0.0])
                    acc[0] += e.count
                    acc[1] += e.self_cpu_time_total
    out = {"tokens": tokens, "mode": "profile", "repeats": repeats, "threads": threads()}
    for v in names:
        total = sum(a[1] for a in ops[v].values())
        rows = sorted(ops[v].items(), key=lambda kv: -kv[1][1])[:top]
        out[v] = {"sdpa_calls_mask_is_none_is_causal": sorted(sdpa_args[v]),
                  "self_cpu_ms_per_forward": round(total / repeats / 1e3, 1),
                  "top_ops": [{"op": k, "calls_per_forward": a[0] / repeats,
                               "self_cpu_ms_per_forward": round(a[1] / repeats / 1e3, 1)}
                              for k, a in rows]}
    return out


def _each_tokens(flag: str, folder: str, args, show) -> None:
    """Run one isolated mode (``--_profile`` / ``--_interleaved``) per token count."""
    results = []
    for tokens in args.tokens:
        entry = run_isolated(__file__, flag, "--_folder", folder,
                             "--tokens", str(tokens), "--repeats", str(args.repeats))
        results.append(entry)
        if not args.json:
            show(tokens, entry, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))


def _show_profile(tokens: int, entry: dict, repeats: int) -> None:
    print(f"tokens={tokens} profile, {repeats} rounds, {threads()} threads")
    for v in ("hf_sdpa", "corelens_sdpa"):
        print(f"  {v}: {entry[v]['self_cpu_ms_per_forward']:.1f} ms self CPU "
              "per forward; SDPA called with (attn_mask is None, is_causal) in "
              f"{entry[v]['sdpa_calls_mask_is_none_is_causal']}")
        for r in entry[v]["top_ops"]:
            print(f"    {r['self_cpu_ms_per_forward']:8.1f} ms  "
                  f"{r['calls_per_forward']:6.1f}x  {r['op']}")


def _show_interleaved(tokens: int, entry: dict, repeats: int) -> None:
    print(f"tokens={tokens} interleaved, {repeats} rounds, {threads()} threads")
    for v in VARIANTS:
        e = entry[v]
        lo, hi = e["time_vs_hf_sdpa_min_max"]
        print(f"  {v:15s} {e['seconds_median']:8.3f}s  "
              f"x{e['time_vs_hf_sdpa_median']:.2f} vs HF SDPA "
              f"(rounds {lo:.2f}-{hi:.2f})  "
              f"max|logits diff| {e['logits_max_abs_diff_vs_hf']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2304])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--interleaved", action="store_true",
                    help="time the variants in alternation in one process (median and min/max "
                    "over --repeats rounds, paired ratios to HF SDPA); no peak memory")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler op table of HF SDPA and corelens SDPA, alternating")
    ap.add_argument("--_variant")
    ap.add_argument("--_interleaved", action="store_true")
    ap.add_argument("--_profile", action="store_true")
    ap.add_argument("--_folder")
    args = ap.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args._folder, args._variant, args.tokens[0], args.repeats)))
        return
    if args._interleaved:
        print(json.dumps(run_interleaved(args._folder, args.tokens[0], args.repeats)))
        return
    if args._profile:
        print(json.dumps(run_profile(args._folder, args.tokens[0], args.repeats)))
        return
    folder = tempfile.mkdtemp(prefix="corelens-bench-")
    build_llava(folder)
    results = []
    if args.profile:
        _each_tokens("--_profile", folder, args, _show_profile)
        return
    if args.interleaved:
        _each_tokens("--_interleaved", folder, args, _show_interleaved)
        return
    for tokens in args.tokens:
        rows = {}
        for v in VARIANTS:
            rows[v] = run_isolated(__file__, "--_variant", v, "--_folder", folder,
                                   "--tokens", str(tokens), "--repeats", str(args.repeats))
        base = rows["hf_sdpa"]
        entry = {"tokens": tokens}
        for v, r in rows.items():
            entry[v] = {
                "seconds": round(r["seconds"], 4),
                "time_vs_hf_sdpa": round(r["seconds"] / base["seconds"], 3),
                "peak_rss_delta_mb": round(r["peak_rss_delta_mb"], 1),
                "logits_rel_diff_vs_hf": abs(r["logits_sum"] - base["logits_sum"])
                / max(abs(base["logits_sum"]), 1e-9),
            }
        results.append(entry)
        if not args.json:
            print(f"tokens={tokens}")
            for v in VARIANTS:
                e = entry[v]
                print(f"  {v:15s} {e['seconds']:8.3f}s  x{e['time_vs_hf_sdpa']:.2f} vs HF SDPA  "
                      f"peak +{e['peak_rss_delta_mb']:.0f} MB")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
