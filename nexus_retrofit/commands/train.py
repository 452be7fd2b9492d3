"""`nexus-retrofit train RECIPE.yaml [--key value ...]`: TRL SFT from an open-r1-style recipe.

Every recipe key can be overridden on the command line (`--learning_rate 1e-5`, `--nexus.order 3`);
unknown keys are errors. For many GPUs, launch the module under accelerate:
`accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m nexus_retrofit.train RECIPE.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import fail

console = Console(stderr=True)

CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML (open-r1 field names, optional `nexus:` block)."),
) -> None:
    """Fine-tune with TRL SFT: the Nexus run with a `nexus:` block, the standard-SFT baseline without.

    Extra `--key value` options override the recipe, e.g. `--max_steps 100 --nexus.inner_lr_multiplier 10`.
    """
    from ..train import RecipeError, run_training

    try:
        result = run_training(recipe, list(ctx.args))
    except RecipeError as e:
        raise fail(str(e)) from None
    loss = result.losses[-1][1] if result.losses else float("nan")
    console.print(
        f"[green]done:[/] {result.output_dir} (final loss {loss:.4f}, {result.train_runtime or 0:.1f} s"
        + (f", {result.tokens_per_second:.0f} tokens/s" if result.tokens_per_second else "")
        + ")"
    )
