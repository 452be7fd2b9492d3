"""Safe outputs (nexus_retrofit.safe_output) through every command that writes: one row per defect.

Each row: the command line, the exit code, a fragment of the one-line error (or of the output), and
what must survive on disk. Every row failed on the code before the safe-output module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nexus_retrofit import safe_output
from nexus_retrofit.cli import app
from nexus_retrofit.safe_output import MARKER, OutputError
from tests.conftest import save_tiny_base

runner = CliRunner()
USER_FILE = "precious.txt"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "base"
    save_tiny_base(folder)
    return folder


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory holding user data, a fake home, a file, and committed results."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / USER_FILE).write_text("user data")
    home = tmp_path / "home"
    home.mkdir()
    (home / USER_FILE).write_text("user data")
    (cwd / "notes.txt").write_text("a file, not a folder")
    (cwd / "mine").mkdir()
    (cwd / "mine" / USER_FILE).write_text("user data")
    for committed in ("eval/results/perf/counts.json", "eval/results/experiments/multihop/results.json"):
        (cwd / committed).parent.mkdir(parents=True)
        (cwd / committed).write_text("committed")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return cwd


def _argv(template: list[str], base_dir: Path, work: Path) -> list[str]:
    values = {"base": str(base_dir), "home": str(work.parent / "home"), "root": Path(work).anchor}
    return [a.format(**values) for a in template]


def _fake_experiment(monkeypatch) -> None:
    """run_experiment stand-in: writes the three files where it is told (or its own default)."""
    import nexus_retrofit.experiments as experiments
    from nexus_retrofit.experiments.common import ExperimentOutput, default_output_dir

    def fake(name, quick=False, seeds=None, output_dir=None, threads=1):
        out = Path(output_dir) if output_dir is not None else default_output_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        for file in ("results.json", "results.md", f"{name}.png"):
            (out / file).write_text("new")
        return ExperimentOutput(name, out / "results.json", out / "results.md", out / f"{name}.png", {})

    monkeypatch.setattr(experiments, "run_experiment", fake)


def _cheap_counts(monkeypatch) -> None:
    import nexus_retrofit.bench.counts as counts

    monkeypatch.setattr(counts, "count_all", lambda seq_len: [])


SURVIVES = {  # path relative to the work dir -> content that must still be there
    "cwd": {USER_FILE: "user data"},
    "home": {"../home/" + USER_FILE: "user data"},
    "mine": {"mine/" + USER_FILE: "user data"},
    "committed": {
        "eval/results/perf/counts.json": "committed",
        "eval/results/experiments/multihop/results.json": "committed",
    },
    "file": {"notes.txt": "a file, not a folder"},
}

CASES = [
    # (argv, exit code, fragment, what must survive, setup)
    pytest.param(["convert", "{base}", ".", "--overwrite"], 2, "current directory", "cwd", None, id="convert-cwd"),
    pytest.param(["convert", "{base}", "{home}", "--overwrite"], 2, "home directory", "home", None, id="convert-home"),
    pytest.param(["convert", "{base}", "{root}", "--overwrite"], 2, "filesystem root", "cwd", None, id="convert-root"),
    pytest.param(["convert", "{base}", "..", "--overwrite"], 2, "containing the current", "cwd", None, id="convert-parent"),
    pytest.param(
        ["convert", "{base}", "mine", "--overwrite"], 2, "not written by nexus-retrofit", "mine", None,
        id="convert-unmarked-overwrite",
    ),
    pytest.param(["convert", "{base}", "notes.txt/out"], 2, "under the file", "file", None, id="convert-under-file"),
    pytest.param(["demo", "--output-dir", ".", "--overwrite"], 2, "current directory", "cwd", None, id="demo-cwd"),
    pytest.param(
        ["demo", "--output-dir", "mine", "--overwrite"], 2, "not written by nexus-retrofit", "mine", None,
        id="demo-unmarked-overwrite",
    ),
    pytest.param(["demo", "--output-dir", "notes.txt/d"], 2, "under the file", "file", None, id="demo-under-file"),
    pytest.param(
        ["experiment", "multihop", "--quick"], 0, "runs/experiments/multihop", "committed", _fake_experiment,
        id="experiment-quick-keeps-committed",
    ),
    pytest.param(
        ["experiment", "multihop", "--output-dir", "eval/results/experiments/multihop"], 2, "not written by",
        "committed", _fake_experiment, id="experiment-refuses-replacing-results",
    ),
    pytest.param(
        ["experiment", "multihop", "--output-dir", "notes.txt/x"], 2, "under the file", "file", _fake_experiment,
        id="experiment-under-file",
    ),
    pytest.param(["bench", "counts"], 0, "runs/perf", "committed", _cheap_counts, id="counts-keeps-committed"),
    pytest.param(
        ["bench", "counts", "--output-dir", "eval/results/perf"], 2, "not written by", "committed", _cheap_counts,
        id="counts-refuses-replacing-results",
    ),
    pytest.param(
        ["bench", "counts", "--output-dir", "notes.txt/perf"], 2, "under the file", "file", _cheap_counts,
        id="counts-under-file",
    ),
    pytest.param(
        ["bench", "speed", "--output-dir", "notes.txt/perf", "--quick"], 2, "under the file", "file", None,
        id="speed-under-file",
    ),
]  # fmt: skip


@pytest.mark.parametrize("argv, code, fragment, survives, setup", CASES)
def test_commands_never_lose_what_they_did_not_write(
    base_dir, work, monkeypatch, argv, code, fragment, survives, setup
):
    if setup is not None:
        setup(monkeypatch)
    before = sorted(p.name for p in work.iterdir())
    result = runner.invoke(app, _argv(argv, base_dir, work))
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert fragment in text
    assert "Traceback" not in result.output and not isinstance(result.exception, OutputError)
    for rel, content in SURVIVES[survives].items():
        assert (work / rel).read_text() == content
    if code != 0:  # refused before any work: nothing new next to the user's files
        assert sorted(p.name for p in work.iterdir()) == before


def test_bench_speed_cuda_without_a_gpu_is_one_line(work):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = runner.invoke(app, ["bench", "speed", "--device", "cuda"])
    assert (
        result.exit_code == 2 and "no CUDA GPU" in result.output and result.exception.__class__ is SystemExit
    )


# ------------------------------------------------------------------------------- convert's folder
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_convert_replaces_its_own_output_with_ordinary_permissions_and_no_temporaries(base_dir, work):
    stale = work / f".out.tmp-{_dead_pid()}-abcdef"  # a killed earlier run's partial weights
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps(safe_output.marker_payload("convert", complete=False)))
    (stale / "model.safetensors").write_bytes(b"half")
    foreign = work / ".out.tmp-1-feed00"  # not ours (no marker): left alone
    foreign.mkdir()
    (foreign / "x").write_text("?")
    assert runner.invoke(app, ["convert", str(base_dir), "out"]).exit_code == 0
    assert not stale.exists() and foreign.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (work / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    marker = json.loads((work / "out" / MARKER).read_text())
    assert marker["tool"] == "nexus-retrofit" and marker["command"] == "convert" and marker["complete"]
    again = runner.invoke(app, ["convert", str(base_dir), "out"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    (work / "out" / "extra.txt").write_text("added by the user since")
    replaced = runner.invoke(app, ["convert", str(base_dir), "out", "--overwrite"])
    assert replaced.exit_code == 0 and "extra.txt" in replaced.output  # named as left in place
    assert (work / "out" / "extra.txt").read_text() == "added by the user since"
    assert (work / "out" / "config.json").is_file()
    assert sorted(p.name for p in work.iterdir() if ".tmp-" in p.name) == [foreign.name]


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from nexus_retrofit.safe_output import atomic_dir
    with atomic_dir(sys.argv[1], overwrite=True, command="test") as tmp:
        (tmp / "model.safetensors").write_text("half written")
        print("ready", flush=True)
        time.sleep(60)
    """
)


def test_sigterm_cleans_the_temporary_and_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with safe_output.atomic_dir(out, command="test") as tmp:
        (tmp / "config.json").write_text("previous")
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").read_text() == "previous"


# ------------------------------------------------------------------------------------ the module
def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), safe_output.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_prepare_output_dir_replaces_only_a_marked_folder(tmp_path):
    out = safe_output.prepare_output_dir(tmp_path / "demo", overwrite=False, command="demo")
    (out / "summary.md").write_text("old")
    safe_output.claim(out, ["summary.md"], "demo")
    with pytest.raises(OutputError, match="--overwrite"):
        safe_output.prepare_output_dir(out, overwrite=False)
    (out / "NOTES.md").write_text("the user's, added since")
    assert safe_output.prepare_output_dir(out, overwrite=True, command="demo") == out
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "NOTES.md"]
    (out / MARKER).unlink()
    (out / "user.txt").write_text("mine now")
    with pytest.raises(OutputError, match="not written by nexus-retrofit"):
        safe_output.prepare_output_dir(out, overwrite=True)
    assert (out / "user.txt").read_text() == "mine now"


@pytest.mark.parametrize(
    "setup, path, fragment",
    [
        ("file", "f.txt/plot.png", "under the file"),
        ("file", "f.txt/a/b/plot.png", "under the file"),
        ("dir", "d", "is a folder"),
        (None, "new/plot.png", None),
    ],
)
def test_check_output_path_for_single_files(tmp_path, setup, path, fragment):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    if fragment is None:
        assert safe_output.check_output_path(tmp_path / path) == (tmp_path / path).resolve()
        return
    with pytest.raises(OutputError, match=fragment):
        safe_output.check_output_path(tmp_path / path)


def test_atomic_write_replaces_whole_files_with_ordinary_permissions(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    safe_output.atomic_write_text(target, "one")
    safe_output.atomic_write_text(target, "two")
    assert target.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        safe_output.atomic_write_text(target, "three")
    assert target.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_an_orphaned_old_copy_is_restored_not_deleted(tmp_path):
    """Killed between the two renames: the previous output lives only in .NAME.old-PID."""
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    safe_output.mark_dir(old, "convert")
    (old / "config.json").write_text("previous")
    safe_output.remove_stale_temporaries(out)
    assert (out / "config.json").read_text() == "previous" and not old.exists()
