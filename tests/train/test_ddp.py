"""Two-process DDP (gloo, CPU) through `accelerate launch -m nexus_retrofit.train`, on the Nexus model.

Bounded on every path: torch elastic starts each rank in a session of its own, so killing the
launcher's process group does not reach the ranks. Every process of a launch carries a unique
environment marker; on a timeout (and after every launch) each process that carries it is killed.
Output goes to files, not pipes, so no wait depends on a rank closing its end of a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import NEXUS, make_recipe

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
LAUNCH_TIMEOUT = 150  # a healthy run takes ~20-40 s on 2 loaded cores


def _free_port() -> int:
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


@pytest.mark.slow
def test_kill_marked_reaches_processes_in_other_sessions(tmp_path):
    """The clean-up itself: a grandchild in a session of its own (as torch elastic starts ranks) dies."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    assert launch([sys.executable, "-c", script], dict(os.environ), tmp_path / "log", timeout=3) is None
    assert time.monotonic() - started < 30
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _sleeps_600(p)]
    assert not leftover


def _sleeps_600(proc: Path) -> bool:
    try:
        return (
            b"time.sleep(600)" in (proc / "cmdline").read_bytes()
            and MARKER.encode() in (proc / "environ").read_bytes()
        )
    except OSError:
        return False


@pytest.mark.slow
def test_two_process_ddp_run(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(
        tiny_model_dir,
        chat_jsonl,
        out,
        max_steps=3,
        nexus={**NEXUS, "inner_lr_multiplier": 2.0, "inner_only_steps": 1},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # torch.distributed variables left by an in-process engine earlier in the session must not leak in
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env = {**inherited, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    code, log = None, tmp_path / "launch-0.log"
    for attempt in range(2):  # a rendezvous that never forms (seen once in ~10 runs) gets one fresh try
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",  # on a CPU-only host: torchrun + gloo
            "--main_process_port", str(_free_port()),  # an engine earlier in the session may hold 29500
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "nexus_retrofit.train", str(path), "--ddp_backend", "gloo",
            *(["--overwrite_output_dir", "true"] if attempt else []),
        ]  # fmt: skip
        log = tmp_path / f"launch-{attempt}.log"
        code = launch(command, env, log, LAUNCH_TIMEOUT)
        if code is not None:
            break
    assert code is not None, f"two-process DDP run timed out twice:\n{log.read_text()[-4000:]}"
    assert code == 0, log.read_text()[-4000:]

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # 32 rows, 8 per process: 2 processes make 2 steps per epoch (1 process would make 4)
    assert state["epoch"] == pytest.approx(1.5)
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["learning_rate"] for e in logged] == [0.0, 3e-3, 3e-3]  # inner-only first step
    assert all(e["learning_rate_nexus"] == pytest.approx(6e-3) for e in logged)
    assert (out / "model.safetensors").is_file() and (out / "nexus_train_config.yaml").is_file()
    assert json.loads((out / "nexus_train_run.json").read_text())["complete"] is True
    assert "Nexus" in json.loads((out / "config.json").read_text())["architectures"][0]
