"""use_peft: LoRA on the outer projections, the Nexus parameters trained in full, merged on save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trl import ModelConfig

import nexus_retrofit
from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.train import run_training
from nexus_retrofit.train.lora import GATES_FILE, check_peft_engine, load_gates, lora_config, unfreeze_gates
from nexus_retrofit.train.recipe import RecipeError
from tests.train.conftest import make_recipe

ASSETS = Path(nexus_retrofit.__file__).parent / "assets"
TINY = ASSETS / "tiny-qwen2"
NEXUS = {"order": 2, "projections": "qk", "inner": "separate", "gate": "open", "inner_init": "zero_out"}
OUTER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def converted(**nexus) -> torch.nn.Module:
    """The asset model converted as run_training converts it (seeded, fp32)."""
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    set_seed(0)
    return convert(model, NexusConfig(**{**NEXUS, **nexus}))


def trainable(model: torch.nn.Module) -> dict[str, set[str]]:
    """Layer 0's trainable parameters, by kind: the modules carrying LoRA, trained in full, gates."""
    kinds: dict[str, set[str]] = {"lora": set(), "full": set(), "gates": set()}
    for name, param in model.named_parameters():
        if not param.requires_grad or ".layers.0." not in name:
            continue
        local = name.split(".layers.0.", 1)[1]
        if ".lora_" in local:
            kinds["lora"].add(local.split(".lora_", 1)[0])
        elif ".modules_to_save." in local:
            kinds["full"].add(local.split(".modules_to_save.", 1)[0])
        elif ".gates." in local:
            kinds["gates"].add(local)
        else:
            kinds.setdefault("other", set()).add(local)
    return kinds


MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize(
    "nexus,targets,lora,full",
    [
        ({}, None, set(OUTER), {"self_attn.inner.q", "self_attn.inner.k"}),
        ({"projections": "qkv"}, None, set(OUTER), {f"self_attn.inner.{p}" for p in "qkv"}),
        ({"inner": "shared", "inner_init": "random", "gate": "zero"}, None, set(OUTER), set()),
        (
            {},
            ["q_proj", "gate_proj"],
            {"self_attn.q_proj", "mlp.gate_proj"},
            {"self_attn.inner.q", "self_attn.inner.k"},
        ),
        ({}, ["all-linear"], set(OUTER) | MLP, {"self_attn.inner.q", "self_attn.inner.k"}),
    ],
    ids=["default", "qkv", "shared", "named", "all-linear"],
)
def test_lora_goes_on_the_outer_projections_and_nexus_parameters_train_in_full(nexus, targets, lora, full):
    from peft import get_peft_model

    model = converted(**nexus)
    args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=targets)
    peft_model = get_peft_model(model, lora_config(args, model))
    unfreeze_gates(peft_model)
    kinds = trainable(peft_model)
    gates = {f"self_attn.gates.{p}" for p in NexusConfig(**{**NEXUS, **nexus}).projections}
    assert kinds == {"lora": lora, "full": full, "gates": gates}


def test_lora_is_refused_where_the_merge_cannot_see_whole_weights(monkeypatch):
    from trl import SFTConfig

    training = SFTConfig(output_dir="unused", use_cpu=True, report_to="none")
    check_peft_engine(training, use_peft=True)  # one process: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_peft_engine(training, use_peft=False)  # FSDP without LoRA: fine
    with pytest.raises(RecipeError, match="use_peft is not supported under FSDP or DeepSpeed ZeRO-3"):
        check_peft_engine(training, use_peft=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Three LoRA steps on the asset model and 64 rows of the asset data, a checkpoint at the last one."""
    folder = tmp_path_factory.mktemp("lora")
    rows = (ASSETS / "data" / "arith_sft.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    data = folder / "arith.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    recipe = make_recipe(
        TINY,
        data,
        folder / "run",
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=192,  # the whole arithmetic prompt and its completion (96 cut every completion away)
        learning_rate=1e-2,  # large, so every trained tensor visibly moves in three steps
        save_strategy="steps",
        save_steps=3,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        nexus={**NEXUS, "inner_lr_multiplier": 0.5, "gate_lr_multiplier": 2.0},
    )
    return run_training(recipe)


def test_lora_run_keeps_the_nexus_learning_rates(lora_run):
    logged = [e for e in lora_run.log_history if "loss" in e]
    assert len(logged) == 3
    for entry in logged:
        assert entry["learning_rate"] == pytest.approx(1e-2)  # the LoRA adapters: the base group
        assert entry["learning_rate_nexus"] == pytest.approx(5e-3)
        assert entry["learning_rate_gates"] == pytest.approx(2e-2)


def test_lora_run_saves_an_ordinary_nexus_checkpoint_equal_to_the_merged_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = lora_run.output_dir
    checkpoint = out / "checkpoint-3"  # the adapter, the inner modules (modules_to_save) and the gates
    assert {"adapter_model.safetensors", "adapter_config.json", GATES_FILE} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not list(out.glob("adapter_*")), "the run folder holds the merged model, not an adapter"
    record = json.loads((out / "nexus_train_run.json").read_text())
    assert record["complete"] and "model.safetensors" in record["files"]
    assert "Nexus" in json.loads((out / "config.json").read_text())["architectures"][0]

    initial = converted()
    start = {k: v.clone() for k, v in initial.state_dict().items()}
    final = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    gates = load_file(checkpoint / GATES_FILE)

    lora_b = [v for k, v in adapter.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "every LoRA B left its zero start"
    assert all(not torch.equal(v, start[k]) for k, v in gates.items()), "every gate trained"
    assert all(torch.equal(final[k], v) for k, v in gates.items())
    inner = [k for k in start if ".self_attn.inner." in k and k.endswith("q_proj.weight")]
    assert inner and all(not torch.equal(final[k], start[k]) for k in inner), "the inner modules trained"
    # the base weights changed only through the merge: outside the LoRA targets they are the start's
    untouched = [k for k in start if not k.endswith(tuple(f"{m}.weight" for m in OUTER)) and "inner" not in k]
    assert all(torch.equal(final[k], start[k]) for k in untouched if ".gates." not in k)
    outer = [k for k in start if k.endswith(tuple(f"{m}.weight" for m in OUTER))]
    assert all(not torch.equal(final[k], start[k]) for k in outer)

    # the saved model's logits are the trained PEFT model's: adapters on the start plus the gates
    peft_model = PeftModel.from_pretrained(initial, checkpoint)
    load_gates(peft_model, checkpoint)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = peft_model.eval()(ids).logits, saved.eval()(ids).logits
    assert (expected - got).abs().max().item() < 1e-4


def test_lora_run_resumes_with_its_gates(lora_run, tmp_path):
    """Three steps, then one more resumed from the checkpoint, give the model four straight steps give."""
    import shutil

    from transformers import AutoModelForCausalLM

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(lora_run.output_dir, resumed)
    recipe = yaml.safe_load((resumed / "nexus_train_config.yaml").read_text())
    recipe.update(max_steps=4, save_strategy="no")
    result = run_training({**recipe, "output_dir": str(resumed), "resume_from_checkpoint": True})
    assert result.resumed_from == str(resumed / "checkpoint-3")
    run_training({**recipe, "output_dir": str(straight)})
    want = AutoModelForCausalLM.from_pretrained(straight, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(resumed, dtype=torch.float32).state_dict()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst < 1e-5, "the gates, inner modules and adapters came back from the checkpoint"
