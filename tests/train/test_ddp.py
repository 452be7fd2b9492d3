"""Two-process DDP (gloo, CPU) through `accelerate launch -m nexus_retrofit.train`, on the Nexus model.

The launches are bounded on every path (see launch.py: every process of a launch is killed by its
environment marker after a timeout or an exit).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import NEXUS, make_recipe
from tests.train.launch import MARKER, accelerate_launch, cpu_env, launch


@pytest.mark.slow
def test_kill_marked_reaches_processes_in_other_sessions(tmp_path):
    """The clean-up itself: a grandchild in a session of its own (as torch elastic starts ranks) dies."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    assert launch([sys.executable, "-c", script], cpu_env(), tmp_path / "log", timeout=3) is None
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
    code, log = accelerate_launch(
        [
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",  # on a CPU-only host: torchrun + gloo
            "--mixed_precision", "no", "--dynamo_backend", "no",
        ],
        ["-m", "nexus_retrofit.train", str(path), "--ddp_backend", "gloo"],
        tmp_path,
        cpu_env(),
        retry_args=["--overwrite_output_dir", "true"],
    )  # fmt: skip
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
