"""``prepare`` vs the bare HF processor (issue #17, item 3): the same 16 grounded examples
(image, question, answer) turned into model inputs, by

- ``bare``: what a competent HF user writes: the chat template per example
  (``processor.apply_chat_template``), the answer appended, one ``processor(images=..., text=...,
  padding=True)`` call (left padding);
- ``corelens``: ``model.prepare_examples(examples)``, which does that and also finds the answer
  tokens and query positions, checks the answer's tokenisation and lays out every vision token
  (``VisionLayout``).

Interleaved repeats, the median of each; the ratio corelens / bare is printed per model, by
wall clock and by this process's CPU time (``time.process_time``: steadier on a shared machine,
where waiting for a core inflates wall times; it counts the tokenizer's worker threads too).

    python bench/prepare.py [--repeats 9] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _bare(model, examples):
    proc = model.processor
    texts = []
    for ex in examples:
        content = [{"type": "image"} for _ in ex.images] + [{"type": "text", "text": ex.question}]
        prompt = proc.apply_chat_template([{"role": "user", "content": content}],
                                          add_generation_prompt=True, tokenize=False)
        texts.append(prompt + " " + ex.answer)
    images = [ex.images for ex in examples]

    def run():
        side = proc.tokenizer.padding_side
        proc.tokenizer.padding_side = "left"
        try:
            return proc(images=images, text=texts, return_tensors="pt", padding=True)
        finally:
            proc.tokenizer.padding_side = side

    def run_with_template():
        for ex in examples:  # the template is part of the bare path too
            content = [{"type": "image"} for _ in ex.images] + [
                {"type": "text", "text": ex.question}]
            proc.apply_chat_template([{"role": "user", "content": content}],
                                     add_generation_prompt=True, tokenize=False)
        return run()

    return run_with_template


def measure(model, examples, repeats: int) -> dict:
    bare = _bare(model, examples)

    def ours():
        return model.prepare_examples(examples)

    bare(), ours()  # warm
    times = {"bare": [], "corelens": []}
    cpu = {"bare": [], "corelens": []}
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("corelens", ours)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {"bare_s": med["bare"], "corelens_s": med["corelens"],
            "ratio": med["corelens"] / med["bare"], "bare_cpu_s": cmed["bare"],
            "corelens_cpu_s": cmed["corelens"], "cpu_ratio": cmed["corelens"] / cmed["bare"],
            "n_examples": len(examples)}


def _line(name: str, r: dict) -> str:
    return (f"{name:<15} bare {r['bare_s'] * 1e3:6.1f} ms  corelens {r['corelens_s'] * 1e3:6.1f} ms"
            f"  ratio {r['ratio']:.2f}   | CPU bare {r['bare_cpu_s'] * 1e3:6.1f} ms  corelens "
            f"{r['corelens_cpu_s'] * 1e3:6.1f} ms  ratio {r['cpu_ratio']:.2f}")


def main() -> None:
    from corelens import HookedMLLM, zoo
    from corelens.data.examples import GroundedExample
    from corelens.zoo.tiny import build_tiny, tiny_image_sizes

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for name in ("toy-llava", "toy-qwen-vl"):
        model = zoo.load(name)
        out[name] = measure(model, zoo.examples(name, 16, seed=3), args.repeats)
        print(_line(name, out[name]))
    from PIL import Image
    for fam in ("llava_next", "idefics3", "internvl", "gemma3"):
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(fam, folder)
            model = HookedMLLM.from_pretrained(folder)
            w, h = tiny_image_sizes(fam)[0]
            exs = [GroundedExample([Image.new("RGB", (w, h), (i * 9 % 255, 80, 120))],
                                   "what color is the square ?", "red", [(0, (0, 0, 8, 8))])
                   for i in range(16)]
            out[f"tiny {fam}"] = r = measure(model, exs, args.repeats)
        print(_line(f"tiny {fam}", r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
