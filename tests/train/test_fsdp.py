"""Two-process FSDP (gloo, CPU) with the shipped FSDP config, on the Nexus model.

recipes/accelerate_configs/fsdp.yaml is for 8 GPUs; the test runs it with CPU overrides written to a
tmp copy (2 processes, no mixed precision, use_cpu). fsdp_sync_module_states is turned off there:
accelerate builds its parameter-init function on an accelerator device and refuses on a CPU-only host
("There are currently no available devices found, must be one of 'XPU', 'CUDA', ..."); it is not
needed because every rank loads the same base weights and converts them with the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.conftest import make_recipe
from tests.train.distributed_probe import check_saved_against_probe
from tests.train.launch import accelerate_launch, cpu_env

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PROBE = Path(__file__).with_name("distributed_probe.py")
NEXUS = {"order": 2, "projections": "qk", "inner": "separate", "gate": "open", "inner_init": "zero_out"}
CPU_OVERRIDES = {"num_processes": 2, "mixed_precision": "no"}
FSDP_CPU_OVERRIDES = {"fsdp_sync_module_states": False}


def cpu_fsdp_config(folder: Path) -> Path:
    """The shipped FSDP config with the CPU overrides, as a file."""
    config = yaml.safe_load((RECIPES / "accelerate_configs" / "fsdp.yaml").read_text())
    config.update(CPU_OVERRIDES)
    config["fsdp_config"].update(FSDP_CPU_OVERRIDES)
    path = folder / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, chat_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    recipe = make_recipe(
        tiny_model_dir,
        chat_jsonl,
        folder / "run",
        max_steps=3,
        nexus={**NEXUS, "inner_lr_multiplier": 2.0, "gate_lr_multiplier": 4.0},
    )
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, log = accelerate_launch(
        ["--config_file", str(cpu_fsdp_config(folder))],
        [str(PROBE), str(folder), str(path)],
        folder,
        cpu_env(),
        retry_args=["--overwrite_output_dir", "true"],
    )
    assert code is not None, f"two-process FSDP run timed out twice:\n{log.read_text()[-4000:]}"
    assert code == 0, log.read_text()[-4000:]
    return folder


def test_fsdp_run_trains_sharded_with_the_nexus_learning_rates(fsdp_run):
    probe = torch.load(fsdp_run / "probe.pt", weights_only=False)
    assert probe["is_fsdp_enabled"] and probe["wrapper"] == "FullyShardedDataParallel"
    full = sum(v.numel() for v in probe["state_dict"].values())
    assert probe["local_numel"] < 0.75 * full, "each rank holds about half the weights"
    state = json.loads((fsdp_run / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert state["epoch"] == pytest.approx(1.5)  # 32 rows, 8 per process: 2 steps per epoch
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(e["loss"] == e["loss"] for e in logged)  # finite
    for entry in logged:  # fsdp_use_orig_params keeps the Nexus parameters in their own groups
        assert entry["learning_rate"] == pytest.approx(3e-3)
        assert entry["learning_rate_nexus"] == pytest.approx(6e-3)
        assert entry["learning_rate_gates"] == pytest.approx(1.2e-2)


def test_fsdp_checkpoint_is_what_the_trainer_held(fsdp_run, tiny_model_dir):
    check_saved_against_probe(fsdp_run, fsdp_run / "run", Path(tiny_model_dir))
