"""Two-process DDP (gloo, CPU) through `accelerate launch -m nexus_retrofit.train`, on the Nexus model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.train.conftest import NEXUS, make_recipe


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
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",  # on a CPU-only host: torchrun + gloo
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "nexus_retrofit.train", str(path), "--ddp_backend", "gloo",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # 32 rows, 8 per process: 2 processes make 2 steps per epoch (1 process would make 4)
    assert state["epoch"] == pytest.approx(1.5)
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["learning_rate"] for e in logged] == [0.0, 3e-3, 3e-3]  # inner-only first step
    assert all(e["learning_rate_nexus"] == pytest.approx(6e-3) for e in logged)
    assert (out / "model.safetensors").is_file() and (out / "nexus_train_config.yaml").is_file()
    assert "Nexus" in json.loads((out / "config.json").read_text())["architectures"][0]
