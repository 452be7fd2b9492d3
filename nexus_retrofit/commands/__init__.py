"""The CLI's commands, one module per command group; `cli.py` registers them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click
import typer
from rich.console import Console

__all__ = ["fail", "guard", "one_line", "failure_line"]

# Set by the CLI's --verbose: then an unexpected error shows its traceback instead of one line.
VERBOSE_ENV = "NEXUS_RETROFIT_VERBOSE"


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


# Words in a library's error text (safetensors, tokenizers and torch wrap the OS error in their own
# exception) -> what it means and the fix.
_OS_PHRASES = (
    (("no space left", "storagefull", "code: 28", "errno 28"), "the disk is full: free some space or write to another disk"),
    (("read-only file system", "code: 30", "errno 30"), "the filesystem is read-only: choose a writable folder"),
    (("permission denied", "code: 13", "errno 13"), "permission denied: choose a folder you can write"),
)  # fmt: skip


def failure_line(error: BaseException) -> str:
    """Any exception as one line for a user: what failed, where (the file when known) and the fix."""
    import pickle

    from ..safe_output import os_error_line

    if isinstance(error, OSError) and error.errno is not None:
        return os_error_line(error)
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({one_line(error)}); re-save it as UTF-8"
    if isinstance(error, pickle.UnpicklingError):
        return (
            f"refused to load a pickle ({one_line(error, 160)}): pickles can run code; convert the "
            "checkpoint to safetensors (save_pretrained) and load that"
        )
    text = one_line(error).lower()
    for phrases, meaning in _OS_PHRASES:
        if any(p in text for p in phrases):
            return f"{meaning} ({type(error).__name__}: {one_line(error, 160)})"
    return f"{type(error).__name__}: {one_line(error)} (nexus-retrofit --verbose ... shows the traceback)"


def guard(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI command so that no traceback reaches a user without --verbose: an unexpected error
    is one `error:` line (exit 1), Ctrl-C is `interrupted` (exit 130)."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
        except Exception as error:
            if os.environ.get(VERBOSE_ENV) == "1":
                raise
            raise fail(failure_line(error), code=1) from None

    return guarded
