"""A few SFT steps of the tiny model: baseline and Nexus, learning-rate groups, inner-only phase, outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, set_seed

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling.names import is_nexus_parameter
from nexus_retrofit.train import CONFIG_FILE, parse_recipe, run_training
from nexus_retrofit.train.trainer import nexus_param_groups
from tests.train.conftest import NEXUS, make_recipe


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _fresh_nexus(model_dir, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the run starts from: the base model converted under the run's seed."""
    set_seed(seed)
    return convert(AutoModelForCausalLM.from_pretrained(model_dir), NexusConfig(**NEXUS)).state_dict()


@pytest.fixture(scope="module")
def nexus_run(tiny_model_dir, chat_jsonl, tmp_path_factory):
    recipe = make_recipe(
        tiny_model_dir,
        chat_jsonl,
        tmp_path_factory.mktemp("nexus") / "run",
        nexus={**NEXUS, "inner_lr_multiplier": 4.0},
    )
    return recipe, run_training(recipe)


def test_baseline_lowers_the_loss(recipe):
    result = run_training(recipe)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.nexus is None
    assert not any(is_nexus_parameter(k) for k in _weights(result.output_dir))
    assert result.train_runtime > 0 and result.tokens_per_second > 0


def test_nexus_lowers_the_loss(nexus_run):
    _, result = nexus_run
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    # the resolved settings (defaults filled in), plus the recipe-only training keys
    assert result.nexus == {
        **NexusConfig(**NEXUS).to_dict(),
        "gate_lr_multiplier": 100.0,  # the measured default for a zero gate
        "inner_lr_multiplier": 4.0,
        "inner_only_steps": 0,
    }


def test_nexus_gates_and_inner_weights_change(nexus_run, tiny_model_dir):
    _, result = nexus_run
    trained, start = _weights(result.output_dir), _fresh_nexus(tiny_model_dir)
    gates = [k for k in trained if ".self_attn.gates." in k]
    inner = [k for k in trained if ".self_attn.inner." in k]
    assert len(gates) == 4 and len(inner) == 2 * 2 * 7  # 2 layers x (q, k) x (q, k, v biases + weights, o)
    assert all(start[k].abs().max() == 0 and trained[k].abs().max() > 0 for k in gates), (
        "gates start at 0 and move"
    )
    assert all(not torch.equal(trained[k], start[k]) for k in inner), "every inner weight trained"
    logged = [e for e in result.log_history if "loss" in e]
    assert logged[-1]["nexus_gate_abs_mean"] > 0


def test_nexus_group_learning_rate_is_scaled(nexus_run):
    _, result = nexus_run
    logged = [e for e in result.log_history if "loss" in e]
    assert all(e["learning_rate"] == pytest.approx(3e-3) for e in logged)
    assert all(e["learning_rate_nexus"] == pytest.approx(4 * 3e-3) for e in logged)


def test_param_groups_split_nexus_and_keep_gates_undecayed(tiny_model_dir):
    model = convert(AutoModelForCausalLM.from_pretrained(tiny_model_dir), NexusConfig(**NEXUS))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {n for n in names.values() if n.endswith("weight") and "norm" not in n}
    groups = {g["name"]: g for g in nexus_param_groups(model.named_parameters(), decay, 0.1, 2e-5, 10.0)}
    assert set(groups) == {"base", "base_no_decay", "nexus", "nexus_no_decay"}
    assert groups["base"]["lr"] == 2e-5 and groups["nexus"]["lr"] == pytest.approx(2e-4)
    assert groups["nexus_no_decay"]["weight_decay"] == 0.0 and groups["nexus"]["weight_decay"] == 0.1
    assert all(
        ".gates." in names[id(p)] or names[id(p)].endswith("bias") for p in groups["nexus_no_decay"]["params"]
    )
    assert all(is_nexus_parameter(names[id(p)]) == g["nexus"] for g in groups.values() for p in g["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(names)


def test_inner_only_steps_freeze_the_base_weights(recipe, tiny_model_dir, tmp_path):
    start = _fresh_nexus(tiny_model_dir)
    frozen = run_training({**recipe, "max_steps": 3, "nexus": {**NEXUS, "inner_only_steps": 3}})
    after = _weights(frozen.output_dir)
    base = [k for k in after if not is_nexus_parameter(k)]
    assert base and all(torch.equal(after[k], start[k]) for k in base), (
        "base weights bit-identical for 3 steps"
    )
    assert any(not torch.equal(after[k], start[k]) for k in after if is_nexus_parameter(k))
    assert [e["learning_rate"] for e in frozen.log_history if "loss" in e] == [0.0, 0.0, 0.0]

    longer = run_training(
        {
            **recipe,
            "max_steps": 5,
            "output_dir": str(tmp_path / "longer"),
            "nexus": {**NEXUS, "inner_only_steps": 3},
        }
    )
    after = _weights(longer.output_dir)
    assert all(not torch.equal(after[k], start[k]) for k in base), "base weights train after the warm-up"
    lrs = [(e["learning_rate"], e["learning_rate_nexus"]) for e in longer.log_history if "loss" in e]
    inner = pytest.approx(3 * 3e-3)  # the default inner_lr_multiplier, 3
    assert lrs == [(0.0, inner)] * 3 + [(3e-3, inner)] * 2


def test_gradient_checkpointing_gives_the_same_losses(recipe, tmp_path):
    runs = [
        run_training(
            {
                **recipe,
                "max_steps": 3,
                "output_dir": str(tmp_path / f"gc{gc}"),
                "gradient_checkpointing": gc,
                "nexus": NEXUS,
            }
        )
        for gc in (False, True)
    ]
    plain, checkpointed = ([loss for _, loss in r.losses] for r in runs)
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_output_loads_with_the_package_and_records_the_recipe(nexus_run):
    recipe, result = nexus_run
    out = result.output_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "NexusQwen2ForCausalLM"
    assert model.config.nexus == NexusConfig(**NEXUS).to_dict()
    assert model.config.use_cache
    assert (out / "tokenizer.json").is_file() and (out / "modeling_nexus.py").is_file()
    saved = parse_recipe(out / CONFIG_FILE, ["--use_cpu", "true"])
    settings = saved.nexus.nexus_config()
    assert saved.nexus.resolved(settings, saved.nexus.gate_lr(settings)[0]) == result.nexus
    assert saved.training.learning_rate == recipe["learning_rate"]
    assert saved.training.max_steps == recipe["max_steps"]
    assert saved.model.model_name_or_path == recipe["model_name_or_path"]


STANDALONE = textwrap.dedent(
    """
    import sys
    sys.modules["nexus_retrofit"] = None  # as on a machine without the package
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # config.json names remote code
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    print(model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])
    """
)


def test_output_loads_without_the_package(nexus_run, tmp_path):
    _, result = nexus_run
    script = tmp_path / "load.py"
    script.write_text(STANDALONE)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script), str(result.output_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert 1 <= int(done.stdout.strip().splitlines()[-1]) <= 4
