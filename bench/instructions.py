"""Instructions per call of the toy all-patterns comparison (``bench/peers.py``), counted by
valgrind: a measure a shared machine's load cannot move (wall and CPU times here swing by
+-10% between runs of the same code). Per-call counts still move by up to ~5% between runs (HF's
side: 156.6 M and 164.2 M on 2026-12-08, same code): a one-off cost landing in one of the two
processes is divided by only ``--calls``; use more calls for a tighter figure.

Each side runs in a process of its own under ``valgrind --tool=cachegrind`` twice, once with
no timed call and once with ``--calls`` calls after the same warm-up; the difference over
``--calls`` is its instructions per call (user space only: page faults and cache misses are
not counted, so this is the work each side asks of the CPU, not its time). Sides:

- ``corelens``: ``peers.corelens_patterns`` (``run_with_cache`` keeping every decoder
  ``hook_pattern``);
- ``nnsight``: ``peers.nnsight_patterns`` (one trace saving every layer's attention weights,
  HF eager attention);
- ``hf``: the plain HF model, eager attention, ``output_attentions=True``, no KV cache: the
  floor both tools pay.

    python bench/instructions.py [--calls 8] [--json F]     # needs valgrind (apt install valgrind)
    python bench/instructions.py --python-calls [--calls 8] # Python calls per call (cProfile)

``--python-calls`` counts instead the Python-level function calls (cProfile's count, builtins
included) per call of each side, each in its own process: where the interpreter work is.

Under valgrind one side takes ~5 minutes of CPU (mostly the imports); the six runs go two at a
time. The minor page faults per call (kernel time, not counted here) are in
``bench/peers.py``'s rows.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

SIDES = ("corelens", "nnsight", "hf")


def one(side: str, calls: int, profile: bool = False) -> None:
    """The body valgrind runs: build both models as peers.py does, warm up, call ``calls``x.
    With ``profile``, print the Python function calls per call (cProfile) instead."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peers
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(1)
    model, folder, pair = peers._toy(8, 0)
    batch = pair.clean
    L = model.cfg.n_layers
    if side == "corelens":
        def fn():
            return peers.corelens_patterns(model, batch)
    else:
        hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
        hf.set_attn_implementation("eager")
        if side == "nnsight":
            import nnsight

            traced = nnsight.NNsight(hf)

            def fn():
                return peers.nnsight_patterns(traced, batch, L)
        else:
            def fn():
                return torch.stack(hf(**dict(batch.inputs), output_attentions=True,
                                      use_cache=False).attentions)
    with torch.no_grad():
        fn()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        for _ in range(calls):
            fn()
        if profiler is not None:
            profiler.disable()
            counted = sum(row[1] for row in pstats.Stats(profiler).stats.values())
            print(json.dumps({"side": side, "python_calls_per_call": counted / calls}))


def _count(side: str, calls: int, folder: str) -> int:
    out = os.path.join(folder, f"{side}.{calls}")
    subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                    f"--cachegrind-out-file={out}", sys.executable, os.path.abspath(__file__),
                    "--one", side, "--calls", str(calls)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("summary:"))


def _python_calls(side: str, calls: int) -> float:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", side, "--calls",
                           str(calls), "--python-calls"],
                          check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return float(row["python_calls_per_call"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--python-calls", action="store_true",
                    help="count Python function calls per call (cProfile), not instructions")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.calls, profile=args.python_calls)
        return
    if args.python_calls:
        _report({s: _python_calls(s, args.calls) for s in SIDES}, "python_calls_per_call",
                args.calls, args.json)
        return
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install -y valgrind")
        return
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(2) as pool:
        jobs = {(s, n): pool.submit(_count, s, n, folder) for s in SIDES for n in (0, args.calls)}
        per_call = {s: (jobs[s, args.calls].result() - jobs[s, 0].result()) / args.calls
                    for s in SIDES}
    _report(per_call, "instructions_per_call", args.calls, args.json)


def _report(per_call: dict[str, float], what: str, calls: int, path: str | None) -> None:
    """Print each side's count per call and the two ratios; write them to ``path`` as JSON."""
    out = {"calls": calls, what: per_call,
           "corelens_over_nnsight": per_call["corelens"] / per_call["nnsight"],
           "corelens_over_hf": per_call["corelens"] / per_call["hf"]}
    for s in SIDES:
        if what == "instructions_per_call":
            print(f"{s:<9} {per_call[s] / 1e6:8.1f} M instructions per call")
        else:
            print(f"{s:<9} {per_call[s]:8.0f} Python calls per call")
    print(f"corelens / nnsight {out['corelens_over_nnsight']:.3f}   corelens / hf "
          f"{out['corelens_over_hf']:.3f}")
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
