"""bench/gpu_check.py's CPU quick mode runs every section and writes a consistent JSON (the
check itself is meant for a GPU machine; this keeps its code paths working here)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corelens.families import FAMILIES

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = {"parity", "ram", "hybrid", "torchrun"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out",
                          str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].endswith(f"--out {out}") and report["device"].startswith("cpu")
    assert set(report["versions"]) == {"torch", "transformers", "transformer_lens"}
    sections = report["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert "error" not in section, (name, section)

    parity = sections["parity"]["families"]
    assert set(parity) == set(FAMILIES)
    for family, entry in parity.items():
        assert entry["float32"]["ok"], (family, entry)
        assert all(math.isfinite(d) for d in entry["bfloat16"]["max_abs_diff"].values())

    rows = sections["ram"]["rows"]
    assert [r["tokens"] for r in rows] == report["settings"]["tokens"]
    for row in rows:
        for variant in ("hf_forward", "hf_forward_logits_to_keep", "corelens_ram"):
            assert _positive(row[variant]["seconds"]), (variant, row)
        assert row["corelens_ram"]["ram_finite"]
        for key, value in row["ratios"].items():
            # a CPU RSS delta may be 0 (the allocator reused memory): no memory ratio then
            assert _positive(value) or (key.startswith("peak_mem") and value is None), (key, row)

    for row in sections["hybrid"]["rows"]:
        assert set(row["variants"]) == {"hf_sdpa", "corelens_full", "hybrid"}, row
        assert row["baselines_agree"], row
        for variant, r in row["variants"].items():
            for key in ("prefill_speedup", "decode_speedup", "kv_bytes_ratio"):
                assert _positive(r[key]), (variant, key, r)
        assert row["variants"]["hybrid"]["kv_bytes_ratio"] < 1

    torchrun = sections["torchrun"]
    assert torchrun["status"] == "ran" and torchrun["backend"] == "gloo", torchrun
    assert torchrun["equal"] and not torchrun["scores_only_in_one"], torchrun
    assert torchrun["max_abs_diff"] and set(torchrun["max_abs_diff"].values()) == {0.0}
