"""The ``corelens`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    from corelens import HookedMLLM
    from corelens.families import get_family

    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=5, desc="corelens demo", unit="step")

    folder = out / f"tiny-{args.family}"
    print(f"NOTE: no trained toy model ships yet; the demo runs on a tiny RANDOM "
          f"{args.family} model built at {folder} (its answers are noise, its plumbing is real).")
    if not (folder / "config.json").exists():
        get_family(args.family).build_tiny(folder, seed=0)
    model = HookedMLLM.from_pretrained(folder)
    steps.update()

    # a grounded example: a red square on grey, the question about it, its box
    img = Image.new("RGB", (96, 64), (128, 128, 128))
    box = (24, 16, 48, 40)
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(220, 30, 30))
    batch = model.prepare([img], ["what is the color of the square ?"], answers=["red"],
                          boxes=[box])
    evidence = batch.evidence_positions(0)
    vision = batch.layout.vision_positions(0)
    steps.update()

    with torch.no_grad():
        with model.attention.use("sdpa"):
            fast = model(batch)
        with model.attention.use("eager"):
            slow = model(batch)
    parity = float((fast - slow).abs().max())
    steps.update()

    # attention mass of each head from the answer-predicting position on the evidence tokens,
    # read from the attention backend's rows (no full pattern is built)
    q = batch.query_positions[0].to(model.device)
    mass = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def tap(inputs):
        rows = inputs.pattern_rows(q[None])[0]  # [head, q, key]
        mass[inputs.layer] = rows[..., evidence.to(rows.device)].sum(-1).mean(-1).float().cpu()

    with torch.no_grad():
        ctx = [model.attention.tap(layer, tap) for layer in range(model.cfg.n_layers)]
        for c in ctx:
            c.__enter__()
        try:
            model(batch)
        finally:
            for c in ctx:
                c.__exit__(None, None, None)
    steps.update()

    flat = mass.flatten()
    top = flat.argsort(descending=True)[:3].tolist()
    H = model.cfg.n_heads
    summary = {
        "model": str(folder),
        "family": model.family.name,
        "random_model": True,
        "n_layers": model.cfg.n_layers,
        "n_heads": H,
        "seq_len": batch.seq_len,
        "vision_tokens": int(len(vision)),
        "evidence_box": list(box),
        "evidence_tokens": [model.to_str_tokens(batch)[int(p)] for p in evidence],
        "sdpa_vs_eager_max_abs_diff": parity,
        "evidence_mass_top_heads": [[i // H, i % H, round(float(flat[i]), 4)] for i in top],
        "seconds": round(time.time() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    steps.update()
    steps.close()
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return 0


def _families(args: argparse.Namespace) -> int:
    from corelens.families import FAMILIES

    for name, fam in sorted(FAMILIES.items()):
        print(f"{name:20s} {', '.join(fam.hf_architectures)}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    import copy

    from corelens.zoo.train import RECIPES, train

    if args.name not in RECIPES:
        print(f"unknown toy model {args.name!r}; recipes: {', '.join(sorted(RECIPES))}",
              file=sys.stderr)
        return 2
    recipe = copy.deepcopy(RECIPES[args.name])
    if args.threads is not None:
        recipe.threads = args.threads
    log = train(args.name, args.out, seed=args.seed, steps=args.steps, recipe=recipe)
    print(json.dumps({k: log[k] for k in ("name", "seed", "seconds", "final_accuracy")}))
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from corelens import zoo

    for name in zoo.names():
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="corelens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the corelens flow end to end on a shipped model")
    demo.add_argument("--out", default="corelens-demo", help="output folder")
    demo.add_argument("--family", default="llava", help="model family of the demo model")
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=_demo)
    fams = sub.add_parser("families", help="list supported model families")
    fams.set_defaults(func=_families)
    zoo = sub.add_parser("zoo", help="the shipped toy models: list them, or train one")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    ztrain = zsub.add_parser("train", help="train a toy model from scratch (CPU; resumable)")
    ztrain.add_argument("--name", default="toy-llava", help="recipe name")
    ztrain.add_argument("--out", required=True, help="output folder (resumes from its ckpt.pt)")
    ztrain.add_argument("--seed", type=int, default=0)
    ztrain.add_argument("--steps", type=int, default=None, help="training steps (recipe default)")
    ztrain.add_argument("--threads", type=int, default=None, help="torch threads")
    ztrain.set_defaults(func=_zoo_train)
    zlist = zsub.add_parser("list", help="list the shipped toy models")
    zlist.set_defaults(func=_zoo_list)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
