"""Hostile tables: every command that writes, run against the same hostile folders.

One table per guarantee, WRITERS x SITUATIONS (a new command is one new row of WRITERS):

* nothing lost:   someone else's files with the names the command writes (refused, untouched); files
                  the user added to a folder the tool wrote (an --overwrite leaves them and names
                  them); symlinks into other folders and an output that is a symlink (their targets
                  untouched);
* one writer:     a second run while another holds the folder is refused, and a killed holder does not
                  leave the folder locked;
* one line:       a read-only filesystem and a full one end in one `error:` line naming the problem,
                  never a traceback, and leave no partial output.

The commands run in-process through the real CLI; the expensive insides of `demo`, `experiment` and
`bench counts` are replaced by stand-ins that write the same files (their output handling is what is
tested), `convert`, `train` and `eval` run for real on the shipped tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nexus_retrofit.cli import app
from nexus_retrofit.demo.assets import tiny_model_path

runner = CliRunner()
THEIRS = "someone else's"


@dataclass(frozen=True)
class Writer:
    """How to run one writing command into a folder OUT."""

    name: str
    argv: Callable[[Path, Path], list[str]]  # (OUT, workspace) -> argv, without the overwrite flag
    overwrite: list[str]  # the flag that lets it replace its own earlier output
    writes: tuple[str, ...]  # names it writes at the top of OUT (foreign files get these names)
    setup: Callable[[pytest.MonkeyPatch], None] | None = None
    shared: bool = False  # writes named files into a shared folder: never removes anything else


def _chat_data(workspace: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{a} plus 1?"},
                {"role": "assistant", "content": f"{a + 1}"},
            ]
        }
        for a in range(8)
    ]
    path = workspace / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_argv(out: Path, workspace: Path) -> list[str]:
    recipe = {
        "model_name_or_path": str(tiny_model_path()),
        "dtype": "float32",
        "dataset_name": str(_chat_data(workspace)),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "report_to": "none",
        "max_length": 96,
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
    }
    path = workspace / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return ["train", str(path), "--output_dir", str(out)]


def _eval_argv(out: Path, workspace: Path) -> list[str]:
    data = workspace / "data"
    data.mkdir(exist_ok=True)
    rows = [
        {"problem": f"What is {a} + 1?", "solution": f"\\boxed{{{a + 1}}}", "answer": str(a + 1)}
        for a in range(2)
    ]
    (data / "math_500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "eval", str(tiny_model_path()), "--tasks", "math_500", "--backend", "hf", "--data-dir", str(data),
        "--num-samples", "1", "--temperature", "0", "--max-new-tokens", "4", "--no-progress",
        "--output-dir", str(out),
    ]  # fmt: skip


def _fake_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import nexus_retrofit.demo.pipeline as pipeline

    def fake(output_dir: Path, max_steps: int, eval_limit: int | None) -> Path:
        (output_dir / "runs").mkdir(exist_ok=True)
        (output_dir / "runs" / "log.txt").write_text("demo")
        pipeline.atomic_write_text(output_dir / "summary.md", "# demo\n")
        return output_dir / "summary.md"

    monkeypatch.setattr(pipeline, "_run_demo", fake)


def _fake_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    import nexus_retrofit.experiments as experiments
    from nexus_retrofit.experiments.common import ExperimentOutput
    from nexus_retrofit.safe_output import atomic_write_text

    def fake(name, quick=False, seeds=None, output_dir=None, threads=1):
        out = Path(output_dir)
        for file in ("results.json", "results.md", f"{name}.png"):
            atomic_write_text(out / file, "new")
        return ExperimentOutput(name, out / "results.json", out / "results.md", out / f"{name}.png", {})

    monkeypatch.setattr(experiments, "run_experiment", fake)


def _cheap_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    import nexus_retrofit.bench.counts as counts

    monkeypatch.setattr(counts, "count_all", lambda seq_len: [])


def _maps_checkpoint() -> Path:
    """The shipped tiny model converted once per session, for attention-maps to read (never written)."""
    import atexit
    import shutil
    import tempfile

    global _MAPS_CHECKPOINT
    if _MAPS_CHECKPOINT is None:
        folder = Path(tempfile.mkdtemp(prefix="nexus-maps-"))
        atexit.register(shutil.rmtree, folder, True)
        made = runner.invoke(
            app, ["convert", str(tiny_model_path()), str(folder / "nexus"), "--dtype", "float32"]
        )
        assert made.exit_code == 0, made.output
        _MAPS_CHECKPOINT = folder / "nexus"
    return _MAPS_CHECKPOINT


_MAPS_CHECKPOINT: Path | None = None


WRITERS = [
    Writer("convert", lambda out, ws: ["convert", str(tiny_model_path()), str(out)], ["--overwrite"],
           ("config.json", "model.safetensors")),
    Writer("train", _train_argv, ["--overwrite_output_dir", "true"], ("config.json", "checkpoint-7")),
    Writer("eval", _eval_argv, ["--overwrite"], ("results.json", "samples_math_500.jsonl")),
    Writer("demo", lambda out, ws: ["demo", "--output-dir", str(out)], ["--overwrite"], ("summary.md",),
           _fake_demo),
    Writer("experiment", lambda out, ws: ["experiment", "multihop", "--output-dir", str(out)], ["--overwrite"],
           ("results.json", "multihop.png"), _fake_experiment, shared=True),
    Writer("bench-counts", lambda out, ws: ["bench", "counts", "--output-dir", str(out)], ["--overwrite"],
           ("counts.json", "counts.md"), _cheap_counts, shared=True),
    Writer("attention-maps", lambda out, ws: ["attention-maps", str(_maps_checkpoint()), "--output-dir", str(out)],
           ["--overwrite"], ("outer.png", "maps.json"), shared=True),
    Writer("init", lambda out, ws: ["init", str(tiny_model_path()), str(out)], ["--overwrite"],
           ("baseline", "nexus", "init.json")),
    Writer("eval-zero-shot", lambda out, ws: ["eval", str(tiny_model_path()), "--tasks", "nexus_tiny_arith",
           "--limit", "4", "--output-dir", str(out)], ["--overwrite"], ("results.json", "samples_nexus_tiny_arith.jsonl")),
]  # fmt: skip


# --------------------------------------------------------------------------------------- helpers
def run(writer: Writer, out: Path, workspace: Path, overwrite: bool = False):
    argv = writer.argv(out, workspace) + (writer.overwrite if overwrite else [])
    return runner.invoke(app, argv)


def contents(folder: Path) -> dict[str, str]:
    """Every file under `folder` (not following links) and its text, for before/after checks."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = path.read_bytes().decode("utf-8", "replace")
    return found


def one_error_line(result) -> str:
    """The run failed with one `error:` line and no traceback; return that line."""
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own at `where` (needs root, as on CI); skip where it cannot be made."""
    where.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({made.stderr.decode().strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from nexus_retrofit.safe_output import output_lock
    with output_lock(sys.argv[1], "another run"):
        print("held", flush=True)
        time.sleep(120)
    """
)


# ---------------------------------------------------------------------------------- nothing lost
@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_someone_elses_files_are_never_replaced(writer, workspace, tmp_path, monkeypatch):
    if writer.setup:
        writer.setup(monkeypatch)
    out = tmp_path / "theirs"
    out.mkdir()
    for name in writer.writes:
        target = out / name
        if name.startswith("checkpoint-"):
            target.mkdir()
            target = target / "optimizer.pt"
        target.write_text(THEIRS)
    (out / "NOTES.md").write_text(THEIRS)
    before = contents(out)
    for overwrite in (False, True):
        line = one_error_line(run(writer, out, workspace, overwrite=overwrite))
        assert "not written by nexus-retrofit" in line, line
        assert contents(out) == before


@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_overwrite_removes_only_what_the_tool_wrote(writer, workspace, tmp_path, monkeypatch):
    if writer.setup:
        writer.setup(monkeypatch)
    out = tmp_path / "out"
    first = run(writer, out, workspace)
    assert first.exit_code == 0, first.output
    (out / "NOTES.md").write_text("the user's notes")
    (out / "my_eval").mkdir()
    (out / "my_eval" / "scores.txt").write_text("the user's scores")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text(THEIRS)
    (out / "link").symlink_to(elsewhere, target_is_directory=True)  # a symlink into another folder
    again = run(writer, out, workspace, overwrite=True)
    assert again.exit_code == 0, again.output
    assert (out / "NOTES.md").read_text() == "the user's notes"
    assert (out / "my_eval" / "scores.txt").read_text() == "the user's scores"
    assert (elsewhere / "data.txt").read_text() == THEIRS and (out / "link").is_symlink()
    assert writer.shared or "NOTES.md" in again.output  # a folder it replaces: named as left in place
    for name in writer.writes:
        if not name.startswith("checkpoint-"):
            assert (out / name).exists(), name  # and the new output is there


@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_an_output_that_is_a_symlink_to_someone_elses_folder(writer, workspace, tmp_path, monkeypatch):
    if writer.setup:
        writer.setup(monkeypatch)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in writer.writes:
        (theirs / name.replace("checkpoint-7", "ckpt.txt")).write_text(THEIRS)
    (tmp_path / "out").symlink_to(theirs, target_is_directory=True)
    before = contents(theirs)
    result = run(writer, tmp_path / "out", workspace, overwrite=True)
    assert result.exit_code != 0, result.output
    assert contents(theirs) == before


def test_train_refuses_a_checkpoint_symlink_before_touching_its_final_model(workspace, tmp_path):
    """Re-running a finished run with a checkpoint-9 symlink in the folder: refused first, nothing lost."""
    train = next(w for w in WRITERS if w.name == "train")
    out = tmp_path / "run"
    assert run(train, out, workspace).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_text(THEIRS)
    (out / "checkpoint-9").symlink_to(elsewhere, target_is_directory=True)
    before = contents(out)
    line = one_error_line(run(train, out, workspace))
    assert "checkpoint-9" in line
    assert contents(out) == before and (elsewhere / "model.safetensors").read_text() == THEIRS


# ------------------------------------------------------------------------------------ one writer
@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_a_concurrent_writer_is_refused_and_a_killed_one_leaves_no_lock(
    writer, workspace, tmp_path, monkeypatch
):
    if writer.setup:
        writer.setup(monkeypatch)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(run(writer, out, workspace))
        assert "being written by another nexus-retrofit run" in line and "another run" in line
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # killed, not stopped: no cleanup runs
        holder.wait()
    after = run(writer, out, workspace, overwrite=True)
    assert after.exit_code == 0, after.output


# -------------------------------------------------------------------------------------- one line
@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_a_read_only_filesystem_is_one_line_before_any_work(writer, workspace, tmp_path, monkeypatch):
    if writer.setup:
        writer.setup(monkeypatch)
    with tmpfs(tmp_path / "ro", "1m") as fs:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        line = one_error_line(run(writer, fs / "out", workspace))
        assert "read-only" in line, line
        assert list(fs.iterdir()) == []


@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name) for w in WRITERS])
def test_a_full_disk_is_one_line_and_leaves_no_partial_output(writer, workspace, tmp_path, monkeypatch):
    if writer.setup:
        writer.setup(monkeypatch)
    with tmpfs(tmp_path / "full", "64k") as fs:
        with contextlib.suppress(OSError), open(fs / "filler", "wb") as f:  # fill it up
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        line = one_error_line(run(writer, fs / "out", workspace))
        assert "disk is full" in line, line
        leftovers = [p.name for p in fs.iterdir() if p.name not in ("filler", "out")]
        assert leftovers == [], leftovers  # no temporaries, no lock
        if (fs / "out").exists():  # an in-place writer may leave its (marked) folder, never half a file
            assert all(".tmp-" not in p.name for p in (fs / "out").rglob("*"))


def test_a_rerun_that_would_train_on_nothing_keeps_the_previous_model(workspace, tmp_path):
    """Before: --max_length cutting every completion away deleted the finished run's model, then crashed."""
    train = next(w for w in WRITERS if w.name == "train")
    out = tmp_path / "run"
    assert run(train, out, workspace).exit_code == 0
    before = contents(out)
    line = one_error_line(runner.invoke(app, train.argv(out, workspace) + ["--max_length", "6"]))
    assert "no completion tokens" in line and "--max_length" in line, line
    assert contents(out) == before


@pytest.mark.parametrize(
    "writer", [pytest.param(w, id=w.name) for w in WRITERS if w.name in ("convert", "train")]
)
def test_weights_get_ordinary_permissions(writer, workspace, tmp_path):
    """Before: model.safetensors was written 0600 (safetensors' temporary file), unreadable to a team."""
    umask = os.umask(0o022)
    try:
        assert run(writer, tmp_path / "out", workspace).exit_code == 0
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
