import json

from corelens.cli import main


def test_demo_writes_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["random_model"] is True
    assert summary["sdpa_vs_eager_max_abs_diff"] < 1e-4
    # the 24x24 px evidence box covers 3x3 of the tiny LLaVA's 8 px tokens after the crop
    assert len(summary["evidence_tokens"]) == 9
    assert all(t.startswith("<img 0:") for t in summary["evidence_tokens"])
    assert "tiny RANDOM" in capsys.readouterr().out


def test_families_lists_llava(capsys):
    assert main(["families"]) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
