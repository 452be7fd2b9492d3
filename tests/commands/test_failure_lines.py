"""Every failure that reaches the command line is one `error:` line naming the file, the problem and
the fix (nexus_retrofit.commands.failure_line / guard); a traceback only with --verbose.

Rows: the exception a library raises -> fragments the line must hold. Before: each was a traceback.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nexus_retrofit.commands import VERBOSE_ENV, failure_line, guard

FAILURES = [
    pytest.param(OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
                 ["/out/model.safetensors", "disk is full", "free some space"], id="disk-full"),
    pytest.param(OSError(errno.EROFS, "Read-only file system", "/ro/results.json"),
                 ["/ro/results.json", "read-only", "writable folder"], id="read-only"),
    pytest.param(PermissionError(errno.EACCES, "Permission denied", "/x/config.json"),
                 ["/x/config.json", "permission denied"], id="permission"),
    pytest.param(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
                 ["disk is full", "RuntimeError"], id="safetensors-disk-full"),
    pytest.param(pickle.UnpicklingError("Weights only load failed"),
                 ["refused to load a pickle", "safetensors"], id="refused-pickle"),
    pytest.param(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                 ["not UTF-8", "re-save it as UTF-8"], id="encoding"),
    pytest.param(KeyError("n_problems"), ["KeyError", "--verbose"], id="anything-else"),
]  # fmt: skip


@pytest.mark.parametrize("error, fragments", FAILURES)
def test_a_failure_is_one_line_with_its_fix(error, fragments):
    line = failure_line(error)
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("error, fragments", FAILURES[:3])
def test_a_guarded_command_prints_the_line_and_no_traceback(error, fragments, monkeypatch):
    def command() -> None:
        raise error

    app = typer.Typer()
    app.command()(guard(command))
    monkeypatch.setenv(VERBOSE_ENV, "0")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and result.output.startswith("error:")
    monkeypatch.setenv(VERBOSE_ENV, "1")  # --verbose: the traceback, for a bug report
    assert type(CliRunner().invoke(app, []).exception) is type(error)


def test_an_eval_summary_of_a_results_file_without_counts_prints(capsys):
    """A results.json of an older release (or edited) without n_problems: before, a KeyError."""
    from nexus_retrofit.commands.evaluate import _print_summary

    results = {"model": {"path": "m"}, "tasks": {"math_500": {"pass@1": 0.5, "stderr": 0.1}}}
    _print_summary(results, Path("."))
    assert "math_500" in capsys.readouterr().out
