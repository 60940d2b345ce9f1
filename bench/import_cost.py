"""Peak RSS and wall time of ``import corelens`` over ``import torch, transformers``.

Each import runs in a fresh interpreter (so nothing is shared), ``--repeat`` times; medians are
printed side by side, with nnsight's import as the peer when it is installed.

    python bench/import_cost.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys

PROBE = """
import resource, sys, time
t = time.perf_counter()
import torch, transformers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t_base = time.perf_counter() - t
t = time.perf_counter()
{stmt}
extra = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base / 1024, peak / 1024, t_base, extra)
"""


def measure(stmt: str, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt)], check=True,
                             capture_output=True, text=True).stdout.split()
        runs.append([float(x) for x in out])
    base, peak, t_base, extra = (statistics.median(col) for col in zip(*runs))
    return {"torch_transformers_mb": base, "added_mb": peak - base, "added_s": extra,
            "torch_transformers_s": t_base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = {"corelens": measure("import corelens", args.repeat)}
    if importlib.util.find_spec("nnsight") is not None:
        rows["nnsight"] = measure("import nnsight", args.repeat)
    print(f"{'import':<10} {'torch+tf MB':>12} {'added MB':>9} {'added s':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['torch_transformers_mb']:>12.0f} {r['added_mb']:>9.0f} "
              f"{r['added_s']:>8.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
