"""`nexus-retrofit demo`: the whole pipeline on the embedded tiny model, on a CPU, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from . import fail


def demo(
    output_dir: Path = typer.Option(
        Path("runs/demo"), "--output-dir", help="Where checkpoints, evals and the summary go."
    ),
    steps: int = typer.Option(200, "--steps", help="SFT steps for each of the two runs."),
    threads: int = typer.Option(
        1, "--threads", help="torch threads (1 is fastest for this tiny model on a CPU)."
    ),
    eval_limit: int = typer.Option(
        None, "--eval-limit", help="Held-out problems per task (default: all 500)."
    ),
    quick: bool = typer.Option(False, "--quick", help="A smoke run: 10 SFT steps, 20 problems per task."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous demo in --output-dir (only a folder a demo wrote)."
    ),
) -> None:
    """Convert the tiny model, SFT baseline and Nexus with one recipe, evaluate both, print the table."""
    import torch
    from rich.console import Console

    from ..demo.pipeline import run_demo
    from ..safe_output import OutputError, check_output_dir

    if quick:
        steps, eval_limit = 10, 20
    if steps < 1 or threads < 1 or (eval_limit is not None and eval_limit < 1):
        raise fail("--steps, --threads and --eval-limit must be >= 1")
    try:  # before any work: never replace a folder the demo did not write
        check_output_dir(output_dir, overwrite, flag="--output-dir")
    except OutputError as e:
        raise fail(str(e)) from None
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = run_demo(output_dir, overwrite=overwrite, max_steps=steps, eval_limit=eval_limit)
    except OutputError as e:
        raise fail(str(e)) from None
    finally:
        torch.set_num_threads(previous_threads)
    Console().print(summary.read_text())
    Console().print(
        f"[green]wrote[/] {output_dir}/ (summary.md, summary.json, loss_curves.png, runs/, eval/)"
    )
