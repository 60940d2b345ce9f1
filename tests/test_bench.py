"""The attention benchmark still runs, its corelens variants compute HF's logits, and what it
prints is consistent: every variant present, times finite, ratios computed from those times."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "attention.py"
VARIANTS = ("hf_sdpa", "bridge_eager", "corelens_sdpa", "corelens_eager")


def _bench(*args):
    out = subprocess.run([sys.executable, str(BENCH), "--tokens", "96", *args, "--json"],
                         capture_output=True, text=True, check=True, timeout=600)
    (entry,) = json.loads(out.stdout)
    assert entry["tokens"] == 96
    return entry


def _ratio_matches(ratio, seconds, base_seconds):
    """``ratio`` (rounded to 3 decimals) is ``seconds / base_seconds``, both rounded to 4
    decimals after the ratio was taken: allow for those roundings only."""
    exact = seconds / base_seconds
    slack = 5e-4 + exact * (5e-5 / seconds + 5e-5 / base_seconds) + 1e-9
    return abs(ratio - exact) <= slack


@pytest.mark.slow
def test_attention_bench_runs_and_agrees():
    entry = _bench("--repeats", "1")
    assert set(entry) == {"tokens", *VARIANTS}
    base = entry["hf_sdpa"]
    assert base["time_vs_hf_sdpa"] == 1.0 and base["logits_rel_diff_vs_hf"] == 0.0
    for variant in VARIANTS:
        e = entry[variant]
        assert set(e) == {"seconds", "time_vs_hf_sdpa", "peak_rss_delta_mb",
                          "logits_rel_diff_vs_hf"}, variant
        assert math.isfinite(e["seconds"]) and e["seconds"] > 0, variant
        assert math.isfinite(e["peak_rss_delta_mb"]), variant
        # the printed ratio is the printed times' ratio (not, say, another variant's)
        assert _ratio_matches(e["time_vs_hf_sdpa"], e["seconds"], base["seconds"]), (variant, e)
        # every variant computes HF's logits, hence each other's
        assert e["logits_rel_diff_vs_hf"] < 1e-4, variant


@pytest.mark.slow
def test_attention_bench_interleaved_is_consistent():
    entry = _bench("--interleaved", "--repeats", "3")
    assert entry["mode"] == "interleaved" and entry["repeats"] == 3
    base = entry["hf_sdpa"]
    assert base["time_vs_hf_sdpa_median"] == 1.0
    assert base["time_vs_hf_sdpa_min_max"] == [1.0, 1.0]
    assert base["logits_max_abs_diff_vs_hf"] == 0.0
    for variant in VARIANTS:
        e = entry[variant]
        lo, hi = e["seconds_min_max"]
        assert 0 < lo <= e["seconds_median"] <= hi and math.isfinite(hi), (variant, e)
        rlo, rhi = e["time_vs_hf_sdpa_min_max"]
        assert 0 < rlo <= e["time_vs_hf_sdpa_median"] <= rhi and math.isfinite(rhi), (variant, e)
        # each round's ratio lies between (fastest / slowest HF) and (slowest / fastest HF)
        # (times rounded to 4 decimals, ratios to 3)
        blo, bhi = base["seconds_min_max"]
        assert rlo >= (lo - 5e-5) / (bhi + 5e-5) - 5e-4, (variant, e)
        assert rhi <= (hi + 5e-5) / (blo - 5e-5) + 5e-4, (variant, e)
        assert e["logits_max_abs_diff_vs_hf"] < 1e-4, variant


@pytest.mark.slow
def test_forward_bench_computes_hfs_logits_and_its_ratios():
    forward = BENCH.parent / "forward.py"
    out = subprocess.run([sys.executable, str(forward), "--models", "toy-llava", "--examples",
                          "2", "--repeats", "3"], capture_output=True, text=True, check=True,
                         timeout=600)
    (row,) = json.loads(out.stdout)["rows"]
    assert row["model"] == "toy-llava" and row["batch"] == 2 and row["repeats"] == 3
    assert set(row["seconds"]) == {"hf", "hf_no_cache", "corelens"}
    assert all(d < 1e-5 for d in row["max_abs_diff_vs_hf"].values()), row
    s, c = row["seconds"], row["cpu_seconds"]
    assert all(math.isfinite(v) and v > 0 for v in [*s.values(), *c.values()]), row
    assert _ratio_matches(row["corelens_over_hf"], s["corelens"], s["hf"]), row
    assert abs(row["corelens_over_hf_cpu"] - c["corelens"] / c["hf"]) < 1e-2, row


@pytest.mark.slow
@pytest.mark.parametrize("side", ["corelens", "hf"])
def test_instructions_bench_body_runs_each_side(side):
    """What ``bench/instructions.py`` runs under valgrind (valgrind itself is not needed for
    this: the body alone, one call after the warm-up)."""
    script = BENCH.parent / "instructions.py"
    subprocess.run([sys.executable, str(script), "--one", side, "--calls", "1"],
                   capture_output=True, text=True, check=True, timeout=600)


def test_instructions_bench_counts_python_calls_per_call():
    """``--python-calls``: each side's Python function calls per call, a positive count, and
    plain HF below corelens (the bridge's component calls come on top of HF's own)."""
    import json

    script = BENCH.parent / "instructions.py"
    counts = {}
    for side in ("corelens", "hf"):
        done = subprocess.run([sys.executable, str(script), "--one", side, "--calls", "2",
                               "--python-calls"], capture_output=True, text=True, check=True,
                              timeout=600)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        assert row["side"] == side
        counts[side] = row["python_calls_per_call"]
    assert 0 < counts["hf"] < counts["corelens"]
