"""Reference analysis of a toy model, with plain HF tools only (the ground truth for corelens).

No corelens metric or intervention is used: the model is the plain HF class its config names
(``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``) loaded from the
folder with eager attention; attention mass
comes from ``output_attentions=True``; ablation is a forward pre-hook on each decoder layer's
``o_proj`` that zeroes one head's slice of its input (that head's output, at every position).
Only the token sets — which sequence positions are the target object's / each distractor's
vision tokens — come from corelens's ``VisionLayout`` (tokens >= 50% inside a box).

Per head (layer l, head h), over examples e, at the position q_e that predicts the answer:
- target mass      T = mean_e sum_{k in target tokens} A[q_e, k]
- distractor mass  D = mean_e mean_{distractor j} sum_{k in tokens of j} A[q_e, k]
- vision mass      V = mean_e sum_{k in all vision tokens} A[q_e, k]
- selectivity      S = T / (T + D)    (0.5 = attends to every object alike)
Ablation: accuracy and mean answer log-prob with one head zeroed (every head in turn), with the
top-k heads by target mass zeroed, and with k random heads zeroed (mean over draws). Depth:
accuracy with the attention and MLP outputs of layers 0..j-1 zeroed (forward hooks on each
decoder layer's ``self_attn`` and ``mlp``), for every j < L: how much the first layers matter.

Run: ``python -m corelens.zoo.reference toy-llava [--n 256]`` (a shipped name or a folder).
"""

from __future__ import annotations

import argparse
import json
import random
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor

from corelens import zoo
from corelens.zoo.scenes import SceneTask, make_examples
from corelens.zoo.train import encode


def load_plain(folder: str | Path) -> tuple[Any, Any]:
    """The plain HF model (the class its ``config.json`` names, eager attention) and processor."""
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = getattr(transformers, (cfg.architectures or ["AutoModelForImageTextToText"])[0])
    model = cls.from_pretrained(folder, attn_implementation="eager", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, proc


def _layers(model: Any) -> list[Any]:
    return list(model.model.language_model.layers)


@contextmanager
def zero_heads(model: Any, heads: list[tuple[int, int]]) -> Iterator[None]:
    """Zero the given heads' slices of the ``o_proj`` input (plain forward pre-hooks)."""
    cfg = model.config.text_config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    handles = []
    for layer, hs in by_layer.items():
        def pre(mod: Any, args: Any, hs: list[int] = hs) -> Any:
            x = args[0].clone()
            for h in hs:
                x[..., h * d:(h + 1) * d] = 0
            return (x,) + tuple(args[1:])
        handles.append(_layers(model)[layer].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def replace_layer_outputs(model: Any, layers: list[int],
                          attn: Callable[[torch.Tensor], torch.Tensor],
                          mlp: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the attention and MLP outputs of the given decoder layers: ``attn(out)`` /
    ``mlp(out)`` instead of ``out``."""
    def on_attn(mod: Any, args: Any, out: Any) -> Any:
        return (attn(out[0]),) + tuple(out[1:])

    def on_mlp(mod: Any, args: Any, out: Any) -> Any:
        return mlp(out)

    handles = []
    for layer in layers:
        block = _layers(model)[layer]
        handles += [block.self_attn.register_forward_hook(on_attn),
                    block.mlp.register_forward_hook(on_mlp)]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def zero_layers(model: Any, layers: list[int]) -> AbstractContextManager[None]:
    """Zero the attention and MLP outputs of the given decoder layers (the residual stream
    passes through them unchanged)."""
    return replace_layer_outputs(model, layers, torch.zeros_like, torch.zeros_like)


def _batches(model: Any, proc: Any, examples: list, batch_size: int) -> list[Any]:
    return [encode(model, proc, examples[i:i + batch_size])
            for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def score(model: Any, batches: list[Any]) -> tuple[float, float]:
    """(accuracy, mean answer log-prob summed over answer tokens) of the plain HF model."""
    good, lp_sum, n = 0, 0.0, 0
    for b in batches:
        logits = model(input_ids=b.input_ids, **b.model_kwargs()).logits.float()
        lp = torch.log_softmax(logits, -1)
        for e, (q, a) in enumerate(zip(b.query_positions, b.answer_tokens)):
            rows = lp[e, q]
            lp_sum += float(rows.gather(-1, a[:, None]).sum())
            good += int(bool((rows.argmax(-1) == a).all()))
            n += 1
    return good / n, lp_sum / n


@torch.no_grad()
def attention_masses(model: Any, batches: list[Any]) -> dict[str, torch.Tensor]:
    """Per-head target / distractor / vision mass at the answer-predicting position."""
    cfg = model.config.text_config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    tgt, dis, vis = torch.zeros(L, H), torch.zeros(L, H), torch.zeros(L, H)
    n = 0
    for b in batches:
        out = model(input_ids=b.input_ids, **b.model_kwargs(), output_attentions=True)
        att = torch.stack(out.attentions, 1)  # [b, L, H, T, T]
        for e in range(len(b)):
            q = int(b.query_positions[e][0])
            row = att[e, :, :, q]  # [L, H, T]
            r = b.evidence_positions(e)
            ds = [p for p in b.distractor_positions(e) if len(p)]
            v = b.layout.vision_positions(e)
            tgt += row[..., r].sum(-1)
            if ds:
                dis += torch.stack([row[..., p].sum(-1) for p in ds]).mean(0)
            vis += row[..., v].sum(-1)
            n += 1
    tgt, dis, vis = tgt / n, dis / n, vis / n
    return {"target": tgt, "distractor": dis, "vision": vis,
            "selectivity": tgt / (tgt + dis).clamp(min=1e-9)}


def run(name_or_dir: str, n: int = 256, seed: int = 4242, batch_size: int = 64,
        ks: tuple[int, ...] = (1, 2, 3, 4), n_random: int = 20) -> dict[str, Any]:
    folder = Path(name_or_dir)
    if not folder.is_dir():
        folder = zoo.path(name_or_dir)
    model, proc = load_plain(folder)
    task = SceneTask.load(folder / "task.json")
    examples = make_examples(task, n, seed=seed)
    batches = _batches(model, proc, examples, batch_size)
    cfg = model.config.text_config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    heads = [(layer, h) for layer in range(L) for h in range(H)]

    base_acc, base_lp = score(model, batches)
    m = attention_masses(model, batches)
    single = {}
    for hd in tqdm(heads, desc="single-head ablation"):
        with zero_heads(model, [hd]):
            single[hd] = score(model, batches)
    order = sorted(heads, key=lambda hd: -float(m["target"][hd]))
    rng = random.Random(seed)
    topk, randk = {}, {}
    for k in tqdm(ks, desc="top-k vs random ablation"):
        with zero_heads(model, order[:k]):
            topk[k] = score(model, batches)
        draws = [score_with(model, batches, rng.sample(heads, k)) for _ in range(n_random)]
        randk[k] = (sum(a for a, _ in draws) / n_random, sum(lp for _, lp in draws) / n_random,
                    min(a for a, _ in draws))
    first_layers = {}
    for j in tqdm(range(1, L), desc="first layers zeroed"):
        with zero_layers(model, list(range(j))):
            first_layers[j] = score(model, batches)
    return {
        "model": str(folder.name), "n_examples": n, "seed": seed, "task": task.to_dict(),
        "base": {"accuracy": base_acc, "logprob": base_lp},
        "first_layers_zeroed": [{"layers": f"0-{j - 1}", "accuracy": round(a, 4),
                                 "logprob": round(lp, 4)} for j, (a, lp) in first_layers.items()],
        "chance": 1 / len(task.answers()),
        "heads": [{"head": f"L{layer}H{h}", "layer": layer, "h": h,
                   "target_mass": round(float(m["target"][layer, h]), 4),
                   "distractor_mass": round(float(m["distractor"][layer, h]), 4),
                   "vision_mass": round(float(m["vision"][layer, h]), 4),
                   "selectivity": round(float(m["selectivity"][layer, h]), 4),
                   "ablated_accuracy": round(single[(layer, h)][0], 4),
                   "ablated_logprob": round(single[(layer, h)][1], 4)}
                  for layer, h in order],
        "topk": [{"k": k, "heads": [f"L{a}H{b}" for a, b in order[:k]],
                  "accuracy": round(topk[k][0], 4), "logprob": round(topk[k][1], 4),
                  "random_accuracy_mean": round(randk[k][0], 4),
                  "random_logprob_mean": round(randk[k][1], 4),
                  "random_accuracy_min": round(randk[k][2], 4), "random_draws": n_random}
                 for k in ks],
    }


def score_with(model: Any, batches: list[Any], heads: list[tuple[int, int]]
               ) -> tuple[float, float]:
    with zero_heads(model, heads):
        return score(model, batches)


def to_markdown(res: dict[str, Any], top: int = 8) -> str:
    b = res["base"]
    lines = [f"Model `{res['model']}`, {res['n_examples']} held-out examples (seed "
             f"{res['seed']}); unablated accuracy {b['accuracy']:.3f}, mean answer log-prob "
             f"{b['logprob']:.3f}; chance {res['chance']:.3f}.", "",
             "Heads ranked by target mass (attention from the answer-predicting position):", "",
             "| head | target mass | distractor mass (mean per object) | vision mass | "
             "selectivity | acc. when ablated | log-prob when ablated |",
             "|---|---|---|---|---|---|---|"]
    for r in res["heads"][:top]:
        lines.append(f"| {r['head']} | {r['target_mass']:.3f} | {r['distractor_mass']:.3f} | "
                     f"{r['vision_mass']:.3f} | {r['selectivity']:.3f} | "
                     f"{r['ablated_accuracy']:.3f} | {r['ablated_logprob']:.3f} |")
    worst = sorted(res["heads"], key=lambda r: r["ablated_accuracy"])[:4]
    lines += ["", "Single heads whose ablation hurts most: " + ", ".join(
        f"{r['head']} (acc {r['ablated_accuracy']:.3f})" for r in worst) + ".", "",
              "Top-k heads by target mass vs k random heads (mean over "
              f"{res['topk'][0]['random_draws']} draws):", "",
              "| k | top-k heads | acc. top-k ablated | log-prob top-k | acc. random k (mean / "
              "min) | log-prob random k |", "|---|---|---|---|---|---|"]
    for t in res["topk"]:
        lines.append(f"| {t['k']} | {' '.join(t['heads'])} | {t['accuracy']:.3f} | "
                     f"{t['logprob']:.3f} | {t['random_accuracy_mean']:.3f} / "
                     f"{t['random_accuracy_min']:.3f} | {t['random_logprob_mean']:.3f} |")
    lines += ["", "Attention and MLP outputs of the first layers zeroed:", "",
              "| layers zeroed | accuracy | log-prob |", "|---|---|---|"]
    lines += [f"| {r['layers']} | {r['accuracy']:.3f} | {r['logprob']:.3f} |"
              for r in res.get("first_layers_zeroed", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="shipped toy model name or folder")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--json", default=None, help="write the full result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = run(args.model, n=args.n, seed=args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
