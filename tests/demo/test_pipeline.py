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
    nexus_row = summary["rows"][2]
    assert set(nexus_row["nexus_path"]) == {"q", "k"} and nexus_row["gate_abs_mean"] is not None
    assert summary["rows"][1]["nexus_path"] is None  # the baseline has no Nexus path
    for task, c in summary["nexus_vs_baseline"].items():
        assert c["n"] == 3 and 0 <= c["differ"] <= 3, task
    text = (out / "summary.md").read_text()
    assert "| nexus-sft |" in text and "Nexus path strength" in text and "differ from the baseline's" in text
    assert (out / "loss_curves.png").stat().st_size > 0
    config = json.loads((out / "runs" / "nexus-sft" / "config.json").read_text())
    assert config["nexus"]["inner"] == "separate" and "nexus" not in json.loads(
        (out / "runs" / "baseline-sft" / "config.json").read_text()
    )
    with safe_open(str(out / "runs" / "nexus-sft" / "model.safetensors"), "pt") as f:
        inner_out = [f.get_tensor(k) for k in f.keys() if ".inner." in k and ".o_proj." in k]
    # zero_out: the inner o_proj starts at 0 and trains from the first step with a non-zero learning
    # rate (the gates, at 1, get a gradient only once it has moved: not within 2 warm-up steps)
    assert inner_out and all(t.abs().max() > 0 for t in inner_out)

    again = CliRunner().invoke(app, ["demo", "--quick", "--output-dir", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


PATH_LOGS = [
    # (log_history, expected path, expected mean |f(g)|)
    ([{"loss": 1.0, "step": 1}], None, None),
    (
        [
            {"loss": 1.0, "nexus_path_q": 0.1, "nexus_path_k": 0.2, "nexus_gate_abs_mean": 0.9},
            {"loss": 0.5, "nexus_path_q": 0.3, "nexus_path_k": 0.4, "nexus_gate_abs_mean": 0.8},
            {"train_runtime": 3.0},
        ],
        {"q": 0.3, "k": 0.4},
        0.8,
    ),
]


@pytest.mark.parametrize("history,path,gate", PATH_LOGS)
def test_path_strength_is_the_last_logged(history, path, gate):
    from nexus_retrofit.demo.pipeline import _path_strength

    assert _path_strength(history) == (path, gate)


def test_findings_say_whether_nexus_differs_and_is_better():
    from nexus_retrofit.demo.pipeline import ModelRow, _findings

    row = ModelRow(name="nexus-sft", path="x", nexus_path={"q": 0.0123, "k": 0.02}, gate_abs_mean=0.99)
    comparison = {
        "arith_1step": {
            "n": 500,
            "differ": 7,
            "difference": 0.004,
            "difference_stderr": 0.003,
            "verdict": "same",
        }
    }
    lines = _findings(row, comparison)
    assert "q 1.23%, k 2.00%" in lines[0] and "0.9900" in lines[0]
    assert "7 of 500" in lines[1] and "+0.4 ± 0.3 points" in lines[1]
