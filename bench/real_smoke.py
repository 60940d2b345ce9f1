"""A real-size smoke run: a LLaVA-1.5-7B-shaped model at FULL depth with the real vocabulary
(random weights, bf16), saved as sharded hub-format safetensors (``model.safetensors.index.json``),
loaded back through ``HookedMLLM.from_pretrained``, one example at the real 336 px resolution
(576 image tokens), RAM-scored; time and peak memory against the plain HF forward of the same
folder, and corelens's answer logits against HF's.

Shape (llava-hf/llava-1.5-7b-hf's config): Llama decoder 4096 wide, 32 layers, 32 heads, MLP
11008, vocabulary 32064; CLIP-L/14-336 tower (1024 wide, 24 layers, 16 heads, MLP 4096), read
at layer -2, "default" strategy, 2-layer GELU projector; the processor resizes the shortest
edge to 336 and centre-crops 336 px. The tokenizer is corelens's word-level test tokenizer
(its ids sit inside the real vocabulary; the weights are random, so the words do not matter).

    python bench/real_smoke.py --folder /tmp/llava-7b-random   # builds it once (~14 GB)
    python bench/real_smoke.py --folder /tmp/llava-7b-random --layers 4   # a shallower check

Each variant runs in its own process (its peak RSS is its own), one forward each (a bf16
forward at full depth takes minutes on a CPU without bf16 instructions): ``hf`` (the HF model,
SDPA, logits at the answer positions only, ``logits_to_keep``) and ``corelens_ram``
(``HookedMLLM`` with ``RamMetric`` attached and the same ``logits_to_keep``: RAM and the answer
logits from one forward, the logits compared with ``hf``'s). Time and peak RSS above the
loaded model are of that one call. Needs ~16 GB of free memory at full depth; prints one JSON
line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reset_peak, run_isolated, status_kb, threads  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32064,
                max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)


def build(folder: Path, layers: int, shard: str) -> dict:
    """Save the random bf16 model (sharded) and its processor; returns what was built."""
    import torch

    from corelens.zoo.tiny.llava import tiny_llava

    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # parameters made in bf16: 14 GB, never 28
    try:
        text = {k: v for k, v in LLAMA_7B.items()
                if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads")}
        model, proc = tiny_llava(folder, d_model=LLAMA_7B["hidden_size"], layers=layers,
                                 heads=LLAMA_7B["num_attention_heads"],
                                 kv_heads=LLAMA_7B["num_key_value_heads"], image_size=336,
                                 patch=14, vision=CLIP_L_336, **text)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, max_shard_size=shard)
    proc.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    return {"parameters": n, "shards": len(shards),
            "index": (folder / "model.safetensors.index.json").is_file(),
            "build_seconds": round(time.perf_counter() - t0, 1)}


def _example():
    from PIL import Image

    from corelens import GroundedExample

    img = Image.new("RGB", (640, 480), (120, 90, 60))
    return GroundedExample(images=[img], question="what color is the square ?",
                           answer="red blue", boxes=[(0, 0, 320, 240)], id="smoke")


def once(fn) -> dict:
    """Seconds and peak RSS above the RSS before it (MB) of one call."""
    gc.collect()
    base = status_kb("VmRSS" if reset_peak() else "VmHWM")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2),
            "peak_rss_delta_mb": round((status_kb("VmHWM") - base) / 1024, 1)}


def run_variant(folder: str, variant: str) -> dict:
    import torch

    torch.set_num_threads(threads())
    from corelens import HookedMLLM

    t0 = time.perf_counter()
    model = HookedMLLM.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    batch = model.prepare_examples([_example()])
    keep = batch.logits_to_keep
    got: dict = {}
    if variant == "hf":
        from transformers import AutoModelForImageTextToText

        del model
        gc.collect()
        t0 = time.perf_counter()
        hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa").eval()
        load_s = time.perf_counter() - t0

        def fn():
            with torch.no_grad():
                got["logits"] = hf(**batch.inputs, logits_to_keep=keep).logits
    else:
        from corelens.scores.ram import RamMetric

        metric = RamMetric(model)

        def fn():
            with torch.no_grad(), metric.attach(batch):
                got["logits"] = model(batch, logits_to_keep=keep)
            got["ram"] = metric.example_level()["ram"][0]
    out = once(fn)
    out.update(load_seconds=round(load_s, 1), seq_len=batch.seq_len,
               vision_tokens=len(batch.layout.vision_positions(0)))
    if "logits" in got:
        q = batch.query_positions[0] - (batch.seq_len - keep)
        out["answer_logits"] = got["logits"][0, q].float().tolist()
    if "ram" in got:
        ram = got["ram"]
        out["ram_top5"] = [int(i) for i in ram.flatten().topk(5).indices]
        out["ram_finite"] = bool(torch.isfinite(ram).all())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, help="where the model is (built if missing)")
    ap.add_argument("--layers", type=int, default=32, help="decoder depth (32 = the real one)")
    ap.add_argument("--shard", default="2GB", help="max_shard_size when building")
    ap.add_argument("--_variant")
    args = ap.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args.folder, args._variant)))
        return
    import torch

    folder = Path(args.folder)
    report: dict = {"shape": {"decoder": {**LLAMA_7B, "num_hidden_layers": args.layers},
                              "vision": CLIP_L_336}, "threads": threads()}
    if not (folder / "model.safetensors.index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        report["built"] = run_isolated_build(folder, args.layers, args.shard)
    rows = {v: run_isolated(__file__, "--folder", str(folder), "--_variant", v)
            for v in ("hf", "corelens_ram")}
    hf, ram = rows["hf"], rows["corelens_ram"]
    diff = (torch.tensor(ram.pop("answer_logits")) - torch.tensor(hf.pop("answer_logits")))
    report.update(
        rows=rows,
        ram_time_vs_hf_forward=round(ram["seconds"] / hf["seconds"], 3),
        ram_peak_mem_vs_hf_forward=round(ram["peak_rss_delta_mb"] / hf["peak_rss_delta_mb"], 3),
        answer_logits_max_abs_diff_vs_hf=float(diff.abs().max()))
    print(json.dumps(report))


def run_isolated_build(folder: Path, layers: int, shard: str) -> dict:
    """Build in a child process, so the 14 GB it holds are freed before the runs."""
    import subprocess

    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import real_smoke; from pathlib import Path; "
            f"print(json.dumps(real_smoke.build(Path({str(folder)!r}), {layers}, {shard!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
