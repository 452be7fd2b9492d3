"""`nexus-retrofit experiment NAME`: the CPU-sized evidence experiments (nexus_retrofit/experiments)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import fail

console = Console(stderr=True)
DEFAULT_ROOT = Path("runs/experiments")


def experiment(
    name: str = typer.Argument(..., help="Experiment: expressivity, multihop, retrofit or ablation."),
    quick: bool = typer.Option(False, "--quick", help="Smoke version: under a minute, 1 seed, few steps."),
    seeds: int = typer.Option(
        None, "--seeds", min=1, help="Number of seeds 0..N-1 (default: the experiment's)."
    ),
    output_dir: Path = typer.Option(
        None,
        "--output-dir",
        help="Where to write results.json, results.md and the PNG (default: runs/experiments/NAME, untracked; "
        "the committed results are in eval/results/experiments/NAME).",
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads (the models are tiny)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --output-dir."),
) -> None:
    """Run an evidence experiment: does higher-order attention do what the paper claims?"""
    from ..experiments import EXPERIMENTS, run_experiment
    from ..safe_output import OutputError, sigterm_as_interrupt, writing_files

    if name not in EXPERIMENTS:
        raise fail(f"unknown experiment {name!r}; available: {', '.join(EXPERIMENTS)}")
    # an untracked default: a run from the repo root must not replace the committed results
    output_dir = output_dir if output_dir is not None else DEFAULT_ROOT / name
    names = ("results.json", "results.md", f"{name}.png")
    try:
        with writing_files(output_dir, names, overwrite, f"experiment {name}"), sigterm_as_interrupt():
            out = run_experiment(name, quick=quick, seeds=seeds, output_dir=output_dir, threads=threads)
    except OutputError as e:
        raise fail(str(e)) from None
    console.print(out.markdown_path.read_text())
    console.print(f"wrote {out.json_path}, {out.markdown_path}, {out.plot_path}")
