"""`nexus-retrofit experiment NAME` (the command function on its own Typer app)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from nexus_retrofit.commands.experiment import experiment
from nexus_retrofit.experiments import EXPERIMENTS, run_experiment


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("experiment")(experiment)
    app.command("other")(lambda: None)  # two commands, so typer keeps the NAME subcommand
    return app


def test_unknown_experiment_fails_clearly():
    result = CliRunner().invoke(_app(), ["experiment", "nope"])
    assert result.exit_code == 2
    assert "unknown experiment" in result.output
    try:
        run_experiment("nope")
    except ValueError as e:
        assert "expressivity" in str(e)
    else:
        raise AssertionError("run_experiment accepted an unknown name")


def test_quick_multihop_through_the_command(tmp_path, monkeypatch):
    import dataclasses

    from nexus_retrofit.experiments import multihop

    tiny = dataclasses.replace(
        multihop.QUICK, steps=4, eval_every=2, depths=(1,), variants=("standard", "separate")
    )
    monkeypatch.setattr(multihop, "QUICK", tiny)
    assert {"expressivity", "multihop"} <= set(EXPERIMENTS)
    result = CliRunner().invoke(_app(), ["experiment", "multihop", "--quick", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results.json").exists() and (tmp_path / "multihop.png").exists()
