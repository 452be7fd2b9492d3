"""Safe outputs: the one place where nexus-retrofit decides what it may write, replace or delete.

Rules (every command that writes follows them):

* A folder the tool writes carries a marker file, ``.nexus-retrofit`` (JSON: which command wrote it,
  when, pid, host). ``--overwrite`` replaces only a marked folder or an empty one; a non-empty folder
  without the marker is refused even with ``--overwrite`` (the tool never deletes what it did not write).
* The current directory, the home directory, a filesystem root, and any folder containing one of them
  are always refused as an output folder; so is a path that is (or is under) an existing file.
* Every check runs before any work starts (call the ``check_*`` function first thing in a command).
* A whole folder is written under a temporary sibling ``.NAME.tmp-<pid>-<token>`` and renamed at the
  end (:func:`atomic_dir`), so an interrupted run never leaves a folder that looks complete. Stale
  temporaries of earlier runs of this tool (marked, owner process dead) are removed.
* SIGTERM is treated like Ctrl-C while output is being written (temporaries cleaned, exit non-zero).
* Single files are written to a temporary name in the same folder and ``os.replace``-d
  (:func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`save_figure`).
* Folders get ordinary permissions (0777 minus the umask, like ``save_pretrained``).

API, by use:

* a folder written whole (convert):               ``with atomic_dir(out, overwrite, "convert") as tmp: ...``
* a folder written in place (demo, train, eval):   ``prepare_output_dir(out, overwrite, "demo")`` -> Path
  (validates, removes a marked previous folder when ``overwrite``, creates and marks the folder);
  ``check_output_dir(out, overwrite)`` validates only; ``is_marked`` / ``mark_dir`` for resume logic.
* named files in a shared folder (bench, experiment): ``check_output_files(folder, names, overwrite)``
* one file (compare --plot):                      ``check_output_path(path)``
* a folder a command fills with files of its own (train, eval): ``check_output_location(out)``
* every check raises :class:`OutputError` (a ``ValueError``) whose message is one line naming the
  problem and the fix; commands print it and exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from types import FrameType

MARKER = ".nexus-retrofit"
TOOL = "nexus-retrofit"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


class OutputError(ValueError):
    """An output path the tool must not write or replace; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ markers
def marker_payload(command: str, complete: bool) -> dict[str, Any]:
    return {
        "tool": TOOL,
        "command": command,
        "complete": complete,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def mark_dir(folder: str | os.PathLike, command: str, complete: bool = True) -> None:
    """Write (or refresh) the marker that says this tool wrote `folder`."""
    atomic_write_text(Path(folder) / MARKER, json.dumps(marker_payload(command, complete), indent=2) + "\n")


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's contents, or None when `folder` has no valid marker of this tool."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def is_marked(folder: str | os.PathLike) -> bool:
    return read_marker(folder) is not None


# ------------------------------------------------------------------------------------------- checks
def _protected(path: Path) -> str | None:
    """Why `path` may never be an output folder (it is, or contains, cwd, home or a root), or None."""
    if path == Path(path.anchor):
        return "a filesystem root"
    for what, place in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        place = place.resolve()
        if path == place:
            return what
        if place.is_relative_to(path):
            return f"a folder containing {what}"
    return None


def _check_not_under_file(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path} is under the file {parent}; choose a path in a folder")
            return


def check_output_location(
    path: str | os.PathLike, flag: str = "output", may_be_protected: bool = False
) -> Path:
    """Validate a folder that a command writes its own files into, in place (train, eval): a folder or a
    new path, not under a file, and (unless `may_be_protected`) not cwd, home, a root or one holding them."""
    resolved = Path(path).expanduser().resolve()
    why = None if may_be_protected else _protected(resolved)
    if why is not None:
        raise OutputError(f"{flag} {path} is {why}; choose a new folder, e.g. {Path(path) / 'run'}")
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{flag} {path} exists and is a file; choose a folder")
    _check_not_under_file(resolved, flag)
    return resolved


def check_output_path(path: str | os.PathLike, flag: str = "output") -> Path:
    """Validate a single output file path (not a folder, not under a file); return it resolved."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'plot.png'}")
    _check_not_under_file(resolved, flag)
    return resolved


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "output") -> Path:
    """Validate a folder this tool will own and (re)write whole; return it resolved.

    Allowed: a missing path, an empty folder, or (with `overwrite`) a folder carrying the marker.
    """
    resolved = Path(path).expanduser().resolve()
    why = _protected(resolved)
    if why is not None:
        raise OutputError(f"{flag} {path} is {why}; choose a new folder, e.g. {Path(path) / 'out'}")
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{flag} {path} exists and is a file; choose another path")
    _check_not_under_file(resolved, flag)
    if resolved.is_dir() and any(p.name != MARKER for p in resolved.iterdir()):
        if not is_marked(resolved):
            raise OutputError(
                f"{flag} {path} is not empty and was not written by nexus-retrofit (no {MARKER} marker); "
                "choose another folder (--overwrite only replaces folders this tool wrote)"
            )
        if not overwrite:
            raise OutputError(f"{flag} {path} is not empty; pass --overwrite to replace it")
    return resolved


def check_output_files(
    folder: str | os.PathLike, names: Iterable[str], overwrite: bool, flag: str = "--output-dir"
) -> Path:
    """Validate a (possibly shared) folder that receives the named files; refuse to replace them
    without `overwrite`. Nothing else in the folder is touched, so no marker is needed."""
    resolved = Path(folder).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{flag} {folder} exists and is a file; choose a folder")
    _check_not_under_file(resolved, flag)
    existing = [n for n in names if (resolved / n).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"{flag} {folder} already has {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --output-dir"
        )
    return resolved


# ------------------------------------------------------------------------------------------ signals
@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so cleanup runs and the exit is non-zero)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------ temporaries
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(output: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings left by killed runs of this tool; return them.

    Only folders this tool provably made are touched: marked (or empty), written on this host, by a
    process that is gone. An orphaned `.old-` copy whose output is missing is renamed back instead.
    """
    output = Path(output).resolve()
    if not output.parent.is_dir():
        return []
    removed = []
    host = socket.gethostname()
    for path in output.parent.iterdir():
        m = _TMP_RE.match(path.name)
        if not m or m["name"] != output.name or not path.is_dir() or _pid_alive(int(m["pid"])):
            continue
        marker = read_marker(path)
        if marker is None and any(path.iterdir()):
            continue
        if marker is not None and marker.get("host", host) != host:
            continue
        if m["kind"] == "old" and not output.exists():
            os.replace(path, output)  # killed between the two renames: the old folder is the only copy
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _make_dir(path: Path) -> None:
    """mkdir with the ordinary 0777-minus-umask mode (mkdtemp's 0700 would hide the checkpoint)."""
    os.mkdir(path)


@contextlib.contextmanager
def atomic_dir(output: str | os.PathLike, overwrite: bool = False, command: str = "") -> Iterator[Path]:
    """Yield a marked temporary sibling folder that replaces `output` only if the block succeeds.

    On any error, Ctrl-C or SIGTERM the temporary is removed and the previous `output` is untouched.
    """
    output = check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    with sigterm_as_interrupt():
        _make_dir(tmp)
        try:
            mark_dir(tmp, command, complete=False)
            yield tmp
            mark_dir(tmp, command, complete=True)
            _swap_into_place(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_into_place(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(output: str | os.PathLike, overwrite: bool, command: str = "") -> Path:
    """For a folder written in place: validate, remove a marked previous folder (with `overwrite`),
    create it and mark it. Returns the resolved path; call `mark_dir(path, command)` when done."""
    output = check_output_dir(output, overwrite)
    if output.is_dir():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    mark_dir(output, command, complete=False)
    return output


# ---------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "wb") as f:  # open() honours the umask (0644), unlike mkstemp's 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
