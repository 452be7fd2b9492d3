"""`nexus-retrofit init CONFIG OUTPUT`: a random baseline and its Nexus version, for pretraining."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..modeling.configuration_nexus import MAX_ORDER
from . import fail, one_line

console = Console(stderr=True)


def init(
    config: str = typer.Argument(
        ...,
        help="Model config: a Hub id (e.g. EleutherAI/pythia-70m), a local model folder or a config.json.",
    ),
    output: Path = typer.Argument(
        ..., help="Folder to write OUTPUT/baseline, OUTPUT/nexus and init.json to."
    ),
    order: int = typer.Option(2, "--order", help=f"Attention order m, 1..{MAX_ORDER} (1 = standard)."),
    proj: str = typer.Option("qk", "--proj", help="Refined projections: q, qk or qkv."),
    inner: str = typer.Option("separate", "--inner", help="Inner attention: separate, shared or self."),
    gate: str = typer.Option(
        "none", "--gate", help="none (the paper's form, X_p = Inner_p(X)), zero or open (a gated residual)."
    ),
    inner_init: str = typer.Option(
        None,
        "--inner-init",
        help="random (the paper's), zero_out (with --gate open) or copy; default: random, zero_out with --gate open.",
    ),
    gate_shape: str = typer.Option("channel", "--gate-shape", help="One gate per channel, head, or scalar."),
    gate_fn: str = typer.Option("identity", "--gate-fn", help="identity or tanh (bounded gate)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random weight (base and Nexus)."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Tokenizer folder or Hub id (default: CONFIG's own, when it has one)."
    ),
    dtype: str = typer.Option(
        "float32", "--dtype", help="float32, bfloat16, float16, or auto (the config's dtype)."
    ),
    revision: str = typer.Option(None, "--revision", help="Hub revision of CONFIG."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an OUTPUT folder written by an earlier nexus-retrofit init."
    ),
) -> None:
    """Randomly initialise a model from its config: the baseline and its Nexus version (same base weights)."""
    from ..initialization import plan_init, write_init
    from ..modeling import NexusConfig
    from ..safe_output import OutputError

    try:  # every input, before anything is built or written
        settings = NexusConfig(
            order=order,
            projections=proj,
            inner=inner,
            gate=gate,
            inner_init=inner_init,
            gate_shape=gate_shape,
            gate_fn=gate_fn,
        )
        plan = plan_init(
            config, output, settings, seed=seed, tokenizer=tokenizer, dtype=dtype, revision=revision,
            overwrite=overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        raise fail(one_line(e)) from None
    try:
        with console.status(f"building and writing {output} ..."):
            result = write_init(plan)
    except OutputError as e:  # another run took the folder since the check
        raise fail(str(e)) from None
    record = result.record
    base, nexus = record["baseline"], record["nexus"]
    console.print(
        f"[green]wrote[/] {result.baseline} ({base['architecture']}, {base['parameters']:,} parameters) and "
        f"{result.nexus} ({nexus['architecture']}, {nexus['parameters']:,} = +{nexus['added_parameters']:,}; "
        f"{settings}), seed {seed}"
    )
    if record["tokenizer"] is None:
        console.print(
            "[yellow]note:[/] CONFIG has no tokenizer files and no --tokenizer was given: none written"
        )
