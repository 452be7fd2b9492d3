"""Two-process DDP (gloo, CPU) through `accelerate launch -m nexus_retrofit.train`, on the Nexus model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


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
    done = None
    for attempt in range(2):  # a rendezvous that never forms (seen once in ~10 runs) gets one fresh try
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",  # on a CPU-only host: torchrun + gloo
            "--main_process_port", str(_free_port()),  # an engine earlier in the session may hold 29500
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "nexus_retrofit.train", str(path), "--ddp_backend", "gloo",
            *(["--overwrite_output_dir", "true"] if attempt else []),
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=150)
            done = (proc.returncode, stderr)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            proc.communicate()
    assert done is not None, "two-process DDP run timed out twice"
    assert done[0] == 0, done[1][-4000:]

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # 32 rows, 8 per process: 2 processes make 2 steps per epoch (1 process would make 4)
    assert state["epoch"] == pytest.approx(1.5)
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["learning_rate"] for e in logged] == [0.0, 3e-3, 3e-3]  # inner-only first step
    assert all(e["learning_rate_nexus"] == pytest.approx(6e-3) for e in logged)
    assert (out / "model.safetensors").is_file() and (out / "nexus_train_config.yaml").is_file()
    assert "Nexus" in json.loads((out / "config.json").read_text())["architectures"][0]
