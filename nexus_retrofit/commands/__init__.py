"""The CLI's commands, one module per command group; `cli.py` registers them."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["fail", "one_line"]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: MESSAGE` on one unwrapped stderr line and return the typer.Exit to raise.

    Code 2 for bad input (like a usage error), 1 for a failure outside the user's control (network).
    """
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) < limit else text[: limit - 3] + "..."
