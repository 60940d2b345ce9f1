"""Decoder forward cost: HF SDPA vs TransformerLens's eager bridge vs corelens's owned attention.

Pinned config: a LLaVA whose Llama decoder has d_model 512, 8 layers, 8 heads; a prompt of
``--tokens`` tokens (text-only: the decoder cost is what differs between the variants). Each
variant runs in its own subprocess so its peak RSS is its own. Ratios are measured side by side
in one run; absolute times on a shared machine mean little.

    python bench/attention.py --tokens 2304 --json
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


def run_variant(folder: str, variant: str, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads())
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
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
        from transformers import AutoModelForImageTextToText, AutoProcessor

        hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
        proc = AutoProcessor.from_pretrained(folder)
        bridge = build_bridge_from_module(hf, "LlavaForConditionalGeneration",
                                          hf_config=hf.config, tokenizer=proc.tokenizer)

        def fwd():
            return bridge(ids, attention_mask=mask, position_ids=pos)
    else:
        from corelens import HookedMLLM

        model = HookedMLLM.from_pretrained(folder)
        model.attention.mode = variant.split("_")[1]

        def fwd():
            return model.bridge(ids, attention_mask=mask, position_ids=pos)

    out = {}

    def run():
        with torch.no_grad():
            out["logits"] = fwd()

    result = timed(run, repeats)
    result["logits_sum"] = float(out["logits"].float().sum())
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2304])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_variant")
    ap.add_argument("--_folder")
    args = ap.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args._folder, args._variant, args.tokens[0], args.repeats)))
        return
    folder = tempfile.mkdtemp(prefix="corelens-bench-")
    build_llava(folder)
    results = []
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
