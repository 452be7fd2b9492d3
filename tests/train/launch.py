"""Bounded multi-process launches for the distributed tests (`accelerate launch`, gloo on CPU).

Bounded on every path: torch elastic starts each rank in a session of its own, so killing the
launcher's process group does not reach the ranks. Every process of a launch carries a unique
environment marker; on a timeout (and after every launch) each process that carries it is killed.
Output goes to files, not pipes, so no wait depends on a rank closing its end of a pipe.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

DIST_VARS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
}
MARKER = "NEXUS_RETROFIT_TEST_LAUNCH"
# A healthy two-process run takes ~10-40 s on 2 loaded cores, most of it each rank importing torch,
# transformers and TRL: the limit is derived from how long that import takes on this machine right now.
MIN_LAUNCH_TIMEOUT = 150
STARTUPS_PER_LAUNCH = 25  # a run is a few rank start-ups plus training: generous, still bounded


@functools.cache
def startup_seconds() -> float:
    """Seconds a fresh interpreter here takes to import what a rank imports (measured once a session)."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import torch, transformers, trl, accelerate"],
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def launch_timeout() -> float:
    return max(MIN_LAUNCH_TIMEOUT, STARTUPS_PER_LAUNCH * startup_seconds())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def marked_pids(token: str) -> list[int]:
    """Every live process whose environment carries MARKER=token (the launcher, its agent, the ranks)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def kill_marked(token: str, grace: float = 10.0) -> list[int]:
    """SIGKILL every marked process until none is left (bounded); return the pids that were killed."""
    killed: list[int] = []
    deadline = time.monotonic() + grace
    while (pids := marked_pids(token)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return killed


def launch(command: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run `command` with a fresh marker; its exit code, or None after a timeout (everything killed)."""
    token = uuid.uuid4().hex
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env={**env, MARKER: token}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group ...
            return None
        finally:
            kill_marked(token)  # ... and the ranks, each in its own session; also strays after an exit
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment for CPU ranks, without torch.distributed variables an in-process engine left."""
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**inherited, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **extra}


def accelerate_launch(
    launcher_args: list[str],
    program: list[str],
    folder: Path,
    env: dict[str, str] | None = None,
    retry_args: list[str] = (),
    timeout: float | None = None,
) -> tuple[int | None, Path]:
    """`accelerate launch LAUNCHER_ARGS PROGRAM`, bounded; (exit code or None, the last log).

    A rendezvous that never forms (seen once in ~10 runs) gets one fresh try, on a fresh port and
    with `retry_args` appended to the program (e.g. to overwrite what the first try wrote).
    """
    code, log = None, folder / "launch-0.log"
    timeout = launch_timeout() if timeout is None else timeout
    for attempt in range(2):
        command = [
            sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
            "--main_process_port", str(free_port()),  # an engine earlier in the session may hold 29500
            *program, *(retry_args if attempt else []),
        ]  # fmt: skip
        log = folder / f"launch-{attempt}.log"
        code = launch(command, env or cpu_env(), log, timeout)
        if code is not None:
            break
    return code, log
