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
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("hf_sdpa", "bridge_eager", "corelens_sdpa", "corelens_eager")


def build(folder: str) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from corelens.families.llava import Llava
    from corelens.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(folder)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, vocab_size=len(tok),
                     max_position_embeddings=16384)
    cfg = LlavaConfig(vision_config=vc, text_config=tc,
                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    # the processor is saved by the family helper's conventions
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    LlavaProcessor(image_processor=LlavaImageProcessorPil(), tokenizer=tok, patch_size=8,
                   chat_template=None).save_pretrained(folder)
    assert Llava  # the folder loads as the llava family


def run_variant(folder: str, variant: str, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))
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

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        fwd()  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            out = fwd()
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": statistics.median(times),
            "peak_rss_delta_mb": (peak - base_rss) / 1024, "logits_sum": float(out.float().sum())}


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
    build(folder)
    results = []
    for tokens in args.tokens:
        rows = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--_variant", v, "--_folder", folder,
                                  "--tokens", str(tokens), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
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
