"""The attention benchmark still runs, and its corelens variants compute HF's logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "attention.py"


@pytest.mark.slow
def test_attention_bench_runs_and_agrees():
    out = subprocess.run([sys.executable, str(BENCH), "--tokens", "96", "--repeats", "1",
                          "--json"], capture_output=True, text=True, check=True, timeout=600)
    (entry,) = json.loads(out.stdout)
    assert entry["tokens"] == 96
    for variant in ("bridge_eager", "corelens_sdpa", "corelens_eager"):
        assert entry[variant]["logits_rel_diff_vs_hf"] < 1e-4, variant
        assert entry[variant]["time_vs_hf_sdpa"] > 0
