"""Two-process DeepSpeed ZeRO-2 and ZeRO-3 (CPU accelerator, gloo) with the shipped configs, on the
Nexus model.

recipes/accelerate_configs/zero{2,3}.yaml are for 8 GPUs in bf16; the test runs them with two
overrides written to a tmp copy (2 processes, no mixed precision). DeepSpeed falls back to its CPU
accelerator and gloo by itself. Cases: ZeRO-2 converting the base model on the fly; ZeRO-3 converting
on the fly (the full base model on every rank, partitioned afterwards); ZeRO-3 training an already
converted checkpoint, which loads straight into `zero.Init` partitions (the path the zero3 config
recommends for large models). Each checks what the trainer held against what it saved, and that
under ZeRO-3 the Nexus attention never fused projections whose weights DeepSpeed had partitioned.
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
GATE_LR = {"gate_lr_multiplier": 4.0}  # a training setting: the recipe's, also for a converted checkpoint
CPU_OVERRIDES = {"num_processes": 2, "mixed_precision": "no"}

CASES = [  # (accelerate config, train a converted checkpoint instead of converting on the fly)
    pytest.param(("zero2", False), id="zero2-convert"),
    pytest.param(("zero3", False), id="zero3-convert"),
    pytest.param(("zero3", True), id="zero3-checkpoint"),
]


def cpu_deepspeed_config(folder: Path, name: str) -> Path:
    config = yaml.safe_load((RECIPES / "accelerate_configs" / f"{name}.yaml").read_text())
    config.update(CPU_OVERRIDES)
    path = folder / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _converted(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny base model converted with NEXUS, with its tokenizer: a Nexus checkpoint on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nexus_retrofit import NexusConfig, convert

    out = folder / "nexus-model"
    torch.manual_seed(0)
    convert(AutoModelForCausalLM.from_pretrained(tiny_model_dir), NexusConfig(**NEXUS)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=CASES)
def deepspeed_run(request, tiny_model_dir, chat_jsonl, tmp_path_factory):
    pytest.importorskip(
        "deepspeed", reason="pip install -e '.[deepspeed]' (scripts/test.sh's latest env has it)"
    )
    name, from_checkpoint = request.param
    folder = tmp_path_factory.mktemp(f"{name}-{'checkpoint' if from_checkpoint else 'convert'}")
    model = _converted(tiny_model_dir, folder) if from_checkpoint else tiny_model_dir
    recipe = make_recipe(
        model,
        chat_jsonl,
        folder / "run",
        max_steps=3,
        max_length=256,  # rows differ (at 64 tokens every row is the same system prompt)
        per_device_train_batch_size=4,
        nexus={**NEXUS, **GATE_LR, "inner_lr_multiplier": 2.0},
    )
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, log = accelerate_launch(
        ["--config_file", str(cpu_deepspeed_config(folder, name))],
        [str(PROBE), str(folder), str(path)],
        folder,
        cpu_env(),
        retry_args=["--overwrite_output_dir", "true"],
    )
    assert code is not None, f"two-process DeepSpeed run timed out twice:\n{log.read_text()[-4000:]}"
    assert code == 0, log.read_text()[-4000:]
    return name, from_checkpoint, folder, model


def test_deepspeed_run_trains_with_the_nexus_learning_rates(deepspeed_run):
    name, _, folder, _ = deepspeed_run
    probe = torch.load(folder / "probe.pt", weights_only=False)
    assert probe["is_deepspeed_enabled"] and probe["wrapper"] == "DeepSpeedEngine"
    full = sum(v.numel() for v in probe["state_dict"].values())
    if name == "zero3":  # parameters partitioned: each rank holds about half
        assert probe["local_numel"] < 0.75 * full
    else:  # ZeRO-2 partitions optimizer state and gradients only
        assert probe["local_numel"] >= full - probe["state_dict"]["model.embed_tokens.weight"].numel()
    state = json.loads((folder / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(e["loss"] == e["loss"] for e in logged)  # finite
    for entry in logged:  # DeepSpeed runs the trainer's optimizer with its parameter groups
        assert entry["learning_rate"] == pytest.approx(3e-3)
        assert entry["learning_rate_nexus"] == pytest.approx(6e-3)
        assert entry["learning_rate_gates"] == pytest.approx(1.2e-2)
    assert logged[0]["nexus_path_q"] == 0.0  # zero_out: the first step is the base model's


def test_zero3_never_fuses_partitioned_projections(deepspeed_run):
    name, _, folder, _ = deepspeed_run
    fusable = torch.load(folder / "probe.pt", weights_only=False)["fusable"]
    if name == "zero3":  # DeepSpeed gathers a weight only in its module's own forward
        assert fusable.get(False, 0) > 0 and fusable.get(True, 0) == 0, fusable
    else:
        assert fusable.get(True, 0) > 0 and fusable.get(False, 0) == 0, fusable


def test_deepspeed_checkpoint_is_what_the_trainer_held(deepspeed_run):
    _, _, folder, source = deepspeed_run
    check_saved_against_probe(folder, folder / "run", Path(source))
