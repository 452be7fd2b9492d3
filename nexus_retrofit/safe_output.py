"""Safe outputs: the one place where nexus-retrofit decides what it may write, replace or delete.

Rules (every command that writes follows them):

* Ownership: a folder the tool writes carries a marker file, ``.nexus-retrofit`` (JSON: which command
  wrote it, when, pid, host) with a *manifest*: the top-level entries the tool wrote there, each with
  its size (and sha256 when small). Only manifest entries are ever removed or replaced: ``--overwrite``
  removes what the tool wrote and leaves (and names) everything else — files added since, or a
  changed file. A non-empty folder without the marker is refused as a whole-folder output even with
  ``--overwrite``; a shared folder (eval, bench, experiment) accepts foreign files but never replaces
  one (:func:`check_no_collisions`).
* Locking: one writer per folder. :func:`output_lock` takes an exclusive ``flock`` on a sibling lock
  file ``.NAME.nexus-retrofit.lock`` (released by the kernel when a process dies, so a killed run never
  leaves it stuck); a second writer is refused naming the first.
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
* a folder written in place (demo, train, eval):   ``with output_lock(out, cmd): ...`` around the run;
  ``check_output_dir(out, overwrite)`` validates; ``remove_owned(out)`` clears the tool's previous
  entries once every input has been checked; ``claim(out, names, cmd)`` records what it wrote.
* named files in a shared folder (bench, experiment): ``check_output_files(folder, names, overwrite)``
* one file (compare --plot):                      ``check_output_path(path)``
* a folder a command fills with files of its own (train, eval): ``check_output_location(out)``
* every check raises :class:`OutputError` (a ``ValueError``) whose message is one line naming the
  problem and the fix; commands print it and exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def mark_dir(
    folder: str | os.PathLike, command: str, complete: bool = True, files: dict[str, Any] | None = None
) -> None:
    """Write (or refresh) the marker that says this tool wrote `folder`; the manifest is kept unless
    `files` replaces it."""
    folder = Path(folder)
    payload = marker_payload(command, complete)
    payload["files"] = manifest(folder) if files is None else files
    atomic_write_text(folder / MARKER, json.dumps(payload, indent=2) + "\n")


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's contents, or None when `folder` has no valid marker of this tool."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def is_marked(folder: str | os.PathLike) -> bool:
    return read_marker(folder) is not None


# ----------------------------------------------------------------------------------------- manifest
_HASHED_UP_TO = 1 << 20  # files up to 1 MiB are hashed (cards, configs, results); larger ones by size


def entry_print(path: Path) -> dict[str, Any]:
    """What an entry looked like when the tool wrote it: a folder, a link, or a file's size (+ sha256)."""
    if path.is_symlink():
        return {"kind": "link", "target": os.readlink(path)}
    if path.is_dir():
        return {"kind": "dir"}
    size = path.stat().st_size
    print_ = {"kind": "file", "size": size}
    if size <= _HASHED_UP_TO:
        print_["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return print_


def manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """{entry name: print} of what this tool wrote in `folder` (empty when unmarked)."""
    files = (read_marker(folder) or {}).get("files")
    return dict(files) if isinstance(files, dict) else {}


def _ignored(name: str) -> bool:
    """The marker, and this tool's own temporaries (cleaned by their writers)."""
    return name == MARKER or bool(_TMP_RE.match(name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: Path) -> None:
    """Give files the tool wrote the mode any other file gets (0666 minus the umask): some writers
    (safetensors through a temporary file) leave weights readable by their owner only (0600)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    wanted = 0o666 & ~_umask()
    for file in files:
        if file.is_symlink():
            continue
        mode = file.stat().st_mode & 0o777
        if mode & 0o077 == 0 and wanted & 0o077:  # owner-only, where the umask would give others access
            with contextlib.suppress(OSError):
                os.chmod(file, mode | (wanted & 0o066))


def claim(
    folder: str | os.PathLike,
    names: Iterable[str],
    command: str,
    complete: bool | None = None,
    mutable: bool = False,
) -> None:
    """Record `names` (top-level entries of `folder`, just written) as this tool's, in the manifest.

    A `mutable` file (one the tool keeps appending to or rewriting: eval's samples and results) is
    owned by its name; any other file by its contents as they are now."""
    folder = Path(folder)
    marker = read_marker(folder) or {}
    files = manifest(folder)
    for name in names:
        path = folder / name
        if not _ignored(name) and (path.exists() or path.is_symlink()):
            if not path.is_symlink():
                ordinary_permissions(path)
            mine = {"kind": "file", "mutable": True} if mutable and path.is_file() else entry_print(path)
            files[name] = mine
    done = marker.get("complete", False) if complete is None else complete
    mark_dir(folder, command or marker.get("command", ""), complete=done, files=files)


def owned_and_foreign(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(entries this tool wrote and nobody changed since, every other entry) of `folder`."""
    folder = Path(folder)
    files = manifest(folder)
    owned, foreign = [], []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _ignored(path.name):
            continue
        recorded = files.get(path.name)
        by_name = recorded is not None and (recorded.get("kind") == "dir" or recorded.get("mutable"))
        same = by_name or (recorded is not None and entry_print(path) == recorded)
        (owned if same else foreign).append(path.name)
    return owned, foreign


def describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_no_collisions(
    folder: str | os.PathLike, will_write: Callable[[str], bool], flag: str = "output"
) -> list[str]:
    """Refuse when an entry the command would write or replace is not the tool's; return the foreign
    entries it will leave alone."""
    folder = Path(folder)
    _, foreign = owned_and_foreign(folder)
    clashing = [n for n in foreign if will_write(n)]
    if clashing:
        raise OutputError(
            f"{flag} {folder} holds {describe(clashing)}, not written by nexus-retrofit (or changed since); "
            "the run would replace it: move it away or choose another folder"
        )
    return foreign


def remove_owned(folder: str | os.PathLike, keep: Iterable[str] = ()) -> list[str]:
    """Remove what this tool wrote in `folder` (its manifest, minus `keep`), nothing else; return the
    entries left in place (foreign, added or changed since), for the caller to name."""
    folder = Path(folder)
    owned, foreign = owned_and_foreign(folder)
    keep = set(keep)
    files = manifest(folder)
    for name in owned:
        if name in keep:
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        files.pop(name, None)
    if is_marked(folder):
        marker = read_marker(folder) or {}
        mark_dir(folder, marker.get("command", ""), complete=False, files=files)
    return foreign


def notify_left(folder: str | os.PathLike, left: list[str]) -> None:
    """Tell the user which entries of theirs an --overwrite left where they were."""
    if left:
        print(f"note: left in {folder} (not written by nexus-retrofit): {describe(left)}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ locking
_held: dict[Path, int] = {}  # folders this process holds the lock of (re-entrant within a process)


def lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.nexus-retrofit.lock")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str = "", flag: str = "output") -> Iterator[None]:
    """Hold the one-writer lock of `folder` for the block; refuse (OutputError) if another process holds it.

    The lock is a ``flock`` on a sibling file: the kernel drops it when the holder dies, so a killed
    run never leaves it stuck; the file is removed on release.
    """
    import fcntl

    folder = Path(folder).expanduser().resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    path = lock_path(folder)
    _check_not_under_file(folder, flag)
    made = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]  # removed again if unused
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {folder}: cannot create its parent folder ({os_reason(e)})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(
                f"{flag} {folder}: cannot write in {folder.parent} ({os_reason(e)}); choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"{flag} {folder} is being written by another nexus-retrofit run ({holder}); wait for it to "
                "finish or choose another folder"
            ) from None
        try:  # the file may have been removed by the previous holder between our open and our flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for the refusal message; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, f"{command or 'a command'}, pid {os.getpid()} on {socket.gethostname()}".encode())
    _held[folder] = 1
    try:
        yield
    finally:
        del _held[folder]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        for parent in made:  # innermost first; a folder something was written into stays
            with contextlib.suppress(OSError):
                parent.rmdir()


# ------------------------------------------------------------------------------------ os errors
_ERRNO_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another folder",
    errno.EROFS: "the filesystem is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write, or fix its permissions",
    errno.EPERM: "permission denied: choose a folder you can write, or fix its permissions",
}


def os_reason(e: OSError) -> str:
    """An OSError as a few words: what went wrong and, where known, the fix."""
    return _ERRNO_FIXES.get(e.errno) or (e.strerror or str(e))


def os_error_line(e: OSError) -> str:
    """One line for a user: the file, the problem, the fix."""
    where = e.filename if e.filename is not None else "a file"
    return f"could not write {where}: {os_reason(e)}"


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
    """Not under a file, and writable where it will be written (checked now, before any work)."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise OutputError(f"{flag} {path} is under the file {place}; choose a path in a folder")
            if not os.access(place, os.W_OK | os.X_OK):
                why = "is on a read-only filesystem" if _read_only_fs(place) else "is not writable"
                raise OutputError(f"{flag} {path}: {place} {why}; choose a folder you can write")
            return


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
    without `overwrite`, and always when they are not the tool's (not in the folder's manifest).
    Nothing else in the folder is touched; the writer claims its files (:func:`claim`)."""
    resolved = Path(folder).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{flag} {folder} exists and is a file; choose a folder")
    _check_not_under_file(resolved, flag)
    names = list(names)
    tops = {n.split("/", 1)[0] for n in names}  # "speed/speed_cpu.json" lives in the entry "speed"
    check_no_collisions(resolved, tops.__contains__, flag)  # never replace someone else's file
    existing = [n for n in names if (resolved / n).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"{flag} {folder} already has {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --output-dir"
        )
    return resolved


@contextlib.contextmanager
def writing_files(
    folder: str | os.PathLike, names: Iterable[str], overwrite: bool, command: str, flag: str = "--output-dir"
) -> Iterator[Path]:
    """For a command that writes named files into a shared folder (bench, experiment): check, hold the
    folder's lock for the block, and claim the files as the tool's afterwards (so a later --overwrite
    may replace them, and only them)."""
    names = list(names)
    resolved = check_output_files(folder, names, overwrite, flag)
    with output_lock(resolved, command, flag):
        check_output_files(folder, names, overwrite, flag)  # again, under the lock
        try:
            yield resolved
        finally:
            written = sorted({n.split("/", 1)[0] for n in names if (resolved / n).is_file()})
            if written:
                claim(resolved, written, command)


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

    Under the folder's lock. On any error, Ctrl-C or SIGTERM the temporary is removed and the previous
    `output` is untouched. Replacing a marked folder removes only its manifest's entries: what the user
    added since stays (and is named); an added entry whose name the new folder also has is refused.
    """
    output = check_output_dir(output, overwrite)
    with output_lock(output, command):
        output = check_output_dir(output, overwrite)  # again, under the lock: it may have been written since
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
        with sigterm_as_interrupt():
            _make_dir(tmp)
            try:
                mark_dir(tmp, command, complete=False, files={})
                yield tmp
                names = [p.name for p in tmp.iterdir() if not _ignored(p.name)]
                claim(tmp, names, command, complete=True)
                notify_left(output, _swap_into_place(tmp, output))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def _swap_into_place(tmp: Path, output: Path) -> list[str]:
    """Put the finished `tmp` where `output` is; return the user's entries left in place."""
    foreign = owned_and_foreign(output)[1] if output.is_dir() else []
    if not foreign:  # nothing of anyone else's: rename the old folder away whole
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return []
    new = [p.name for p in tmp.iterdir() if p.name != MARKER]
    clashing = sorted(set(new) & set(foreign))
    if clashing:
        raise OutputError(
            f"{output} holds {describe(clashing)}, added or changed since nexus-retrofit wrote it, and the new "
            "folder has the same names: move them away and run again (the previous folder is unchanged)"
        )
    # The user's entries never leave `output`: the tool's old entries move out, the new ones move in.
    mark_dir(output, read_marker(output).get("command", ""), complete=False)
    old = output.with_name(f".{output.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    _make_dir(old)
    mark_dir(old, "", complete=False, files={})
    for name in owned_and_foreign(output)[0]:
        os.replace(output / name, old / name)
    for name in new:
        os.replace(tmp / name, output / name)
    os.replace(tmp / MARKER, output / MARKER)
    os.rmdir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    return foreign


def prepare_output_dir(output: str | os.PathLike, overwrite: bool, command: str = "") -> Path:
    """For a folder written in place (call under :func:`output_lock`): validate, remove what the tool
    wrote there before (with `overwrite`; the user's entries stay and are named), create and mark it.
    Returns the resolved path; call `mark_dir(path, command)` when done."""
    output = check_output_dir(output, overwrite)
    if output.is_dir():
        notify_left(output, remove_owned(output))
    output.mkdir(parents=True, exist_ok=True)
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
