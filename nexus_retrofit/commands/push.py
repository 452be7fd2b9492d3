"""`nexus-retrofit push`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import fail

console = Console(stderr=True)


def push(
    model: Path = typer.Argument(..., help="Checkpoint folder to publish."),
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. your-name/Qwen2.5-1.5B-Nexus."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    results: Path = typer.Option(
        None, "--results", help="results.json from `nexus-retrofit eval` for the card."
    ),
    base_model: str = typer.Option(
        None, "--base-model", help="Hub id of the base model (when config.json lacks it)."
    ),
    recipe: Path = typer.Option(None, "--recipe", help="Training recipe YAML to show on the card."),
    license: str = typer.Option(
        None, "--license", help="License id for the card metadata (e.g. apache-2.0)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Write the card and list the files; upload nothing."
    ),
    overwrite_card: bool = typer.Option(
        False, "--overwrite-card", help="Replace a README.md not written by push."
    ),
    token: str = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token (default: your login)."),
) -> None:
    """Upload a checkpoint with a model card: settings, usage, recipe, eval table.

    Only model files are uploaded (top-level safetensors, config, tokenizer, bundled modeling code,
    card, recipe); everything else is listed as left out. Refused: credentials in those files, symlinks
    out of the folder, and --results scored on another model or holding scores outside [0, 1].
    """
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import PushError, push_to_hub

    try:
        plan = push_to_hub(
            model,
            repo_id,
            private=private,
            results_path=results,
            base_model=base_model,
            recipe=recipe,
            license=license,
            dry_run=dry_run,
            overwrite_card=overwrite_card,
            token=token,
        )
    except (PushError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    except HfHubHTTPError as e:
        message = " ".join(str(e).split())
        raise fail(
            f"the Hub refused the upload: {message}. Logged in (`hf auth login`) with write access?", code=1
        ) from None
    except _network_errors() as e:
        message = " ".join(str(e).split())
        raise fail(
            f"could not reach the Hub ({type(e).__name__}: {message}); check the network (and HF_HUB_OFFLINE), "
            "or use --dry-run",
            code=1,
        ) from None
    console.print(f"wrote the model card to {plan.card_path}")
    verb = "would upload" if dry_run else "uploaded"
    typer.echo(f"{verb} to {repo_id}{' (private)' if private else ''}:")
    for name in plan.files:
        typer.echo(f"  {name}")
    if plan.skipped:
        typer.echo("left out (only model files are uploaded):")
        width = max(len(name) for name in plan.skipped)
        for name, why in plan.skipped.items():
            typer.echo(f"  {name.ljust(width)}  {why}")
    if plan.url:
        console.print(f"[green]done[/]: {plan.url}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the Hub could not be reached': OSError and the HTTP client's own errors."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # that client is not installed: its errors cannot occur
    return tuple(errors)
