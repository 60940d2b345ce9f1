"""The nnsight comparison (``bench/peers.py``) still runs at toy size and agrees with nnsight.

nnsight is the optional ``bench`` extra (``pip install -e '.[bench]'``). CI does not install it,
so there this test is skipped (``pytest.importorskip``); run it where the extra is installed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"


@pytest.mark.slow
def test_peers_bench_toy_agrees_with_nnsight():
    pytest.importorskip("nnsight", reason="nnsight (the bench extra: pip install -e "
                        "'.[bench]') is not installed; CI does not install it")
    env = {**os.environ, "BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH), "--width", "toy", "--repeats", "1",
                          "--json"], capture_output=True, text=True, check=True, timeout=600,
                         env=env)
    report = json.loads(out.stdout)
    assert "skipped" not in report, report
    rows = {r["comparison"]: r for r in report["rows"]}
    assert set(rows) == {"patch_heads_sweep", "all_patterns", "ram"}
    for name, row in rows.items():
        assert row["width"] == "toy" and row["repeats"] == 1
        assert row["equal"] and row["max_abs_diff"] <= row["tolerance"], row  # equal numbers
        for key in ("corelens_s", "nnsight_s", "ratio_nnsight_over_corelens"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    sweep = rows["patch_heads_sweep"]
    assert sweep["heads_swept"] == sweep["n_layers"] * sweep["n_heads"] == 16
    assert {g["goal"] for g in report["goals"]} >= {
        "all-heads sweep not slower than nnsight's loop at toy size"}
