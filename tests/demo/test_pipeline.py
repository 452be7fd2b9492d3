"""The demo end to end at smoke size: convert, two SFT runs, three evals, table, plot."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from nexus_retrofit.cli import app


@pytest.mark.slow
def test_demo_smoke_run(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--steps", "2", "--eval-limit", "3", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conversion_max_logit_diff"] == 0.0  # open gate, zero o_proj: the source model
    names = [row["name"] for row in summary["rows"]]
    assert names == ["pretrained (no SFT)", "baseline-sft", "nexus-sft"]
    for row in summary["rows"]:
        assert set(row["accuracy"]) == {"arith_1step", "arith_2step"}
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())
    assert len(summary["curves"]["baseline"]) >= 1 and len(summary["curves"]["nexus"]) >= 1
    assert "| nexus-sft |" in (out / "summary.md").read_text()
    assert (out / "loss_curves.png").stat().st_size > 0
    config = json.loads((out / "runs" / "nexus-sft" / "config.json").read_text())
    assert config["nexus"]["inner"] == "separate" and "nexus" not in json.loads(
        (out / "runs" / "baseline-sft" / "config.json").read_text()
    )
    with safe_open(str(out / "runs" / "nexus-sft" / "model.safetensors"), "pt") as f:
        gates = [f.get_tensor(k) for k in f.keys() if ".gates." in k]
    assert gates and any((g - 1).abs().max() > 0 for g in gates)  # SFT moved the gates from their start at 1

    again = CliRunner().invoke(app, ["demo", "--quick", "--output-dir", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
