"""Recipes: YAML + overrides parse to the right values; bad recipes fail naming the key; shipped recipes parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.train import RecipeError, parse_recipe, run_training
from tests.train.conftest import NEXUS, build_tokenizer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SFT_RECIPES = sorted(RECIPES.glob("*/sft/*.yaml"))
# the shipped recipes ask for bf16, which TrainingArguments checks against the device
CPU = ["--use_cpu", "true"]


def _write(tmp_path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_yaml_and_overrides_round_trip(recipe, tmp_path):
    path = _write(tmp_path, {**recipe, "learning_rate": "1e-4", "nexus": {"order": 3, "inner": "self"}})
    parsed = parse_recipe(
        path,
        [
            "--learning_rate", "2.5e-5",  # overrides win over the recipe
            "--num_train_epochs=2",
            "--packing",  # a bare flag is true
            "--bf16", "false",
            "--lr_scheduler_type", "cosine_with_min_lr",
            "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}',
            "--nexus.inner_lr_multiplier", "10",
            "--nexus.projections", "qkv",
        ],
    )  # fmt: skip
    t = parsed.training
    assert t.learning_rate == 2.5e-5 and t.num_train_epochs == 2.0 and t.packing is True and t.bf16 is False
    assert t.lr_scheduler_type == "cosine_with_min_lr" and t.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert t.max_steps == 6 and t.per_device_train_batch_size == 8 and t.output_dir == recipe["output_dir"]
    assert parsed.model.model_name_or_path == recipe["model_name_or_path"] and parsed.model.dtype == "float32"
    assert parsed.script.dataset_name == recipe["dataset_name"]
    n = parsed.nexus
    assert (n.order, n.inner, n.projections) == (3, "self", "qkv")
    assert (n.inner_lr_multiplier, n.inner_only_steps) == (10.0, 0)
    assert n.nexus_config() == NexusConfig(order=3, inner="self", projections="qkv")

    again = parse_recipe(yaml.safe_load(parsed.to_yaml()))  # the saved form parses to the same run
    assert again.training.learning_rate == 2.5e-5
    assert again.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert again.nexus.architecture() == {"order": 3, "inner": "self", "projections": "qkv"}


def test_mapping_overrides_and_baseline_from_a_nexus_recipe(recipe):
    parsed = parse_recipe({**recipe, "nexus": NEXUS}, {"max_steps": 9, "nexus": {"inner_only_steps": 4}})
    assert parsed.training.max_steps == 9 and parsed.nexus.inner_only_steps == 4 and parsed.nexus.order == 2
    assert parse_recipe({**recipe, "nexus": NEXUS}, ["--nexus", "none"]).nexus is None
    assert parse_recipe(recipe).nexus is None


@pytest.mark.parametrize(
    "old,value,new,expected",
    [
        ("warmup_ratio", 0.03, "warmup_steps", 0.03),
        ("max_seq_length", 512, "max_length", 512),
        ("torch_dtype", "bfloat16", "dtype", "bfloat16"),
        ("evaluation_strategy", "no", "eval_strategy", "no"),
    ],
)
def test_open_r1_names_are_mapped_with_a_note(recipe, old, value, new, expected):
    recipe = {k: v for k, v in recipe.items() if k != new}
    parsed = parse_recipe({**recipe, old: value})
    got = getattr(parsed.training, new, None) if new != "dtype" else parsed.model.dtype
    assert str(getattr(got, "value", got)) == str(expected)
    assert any(f"`{old}` is `{new}`" in note for note in parsed.notes)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"lerning_rate": 1e-4},
            r"unknown recipe key\(s\): 'lerning_rate' \(did you mean 'learning_rate'\?\)",
        ),
        ({"benchmarks": ["math_500"]}, "'benchmarks' is an open-r1 setting"),
        ({"warmup_ratio": 3}, r"warmup_ratio must be in \[0, 1\)"),
        ({"learning_rate": "fast"}, "learning_rate.*invalid float value: 'fast'"),
        ({"load_in_4bit": True}, "load_in_4bit is not supported"),
        ({"use_peft": True, "lora_dropout": 2.0}, r"lora_dropout must be in \[0, 1\), got 2.0"),
        ({"use_peft": True, "lora_r": 0}, "lora_r must be an integer >= 1, got 0"),
        ({"nexus": {"order": 0}}, r"nexus.order must be an integer from 1 to 4"),
        ({"nexus": {"order": 7}}, r"nexus.order must be an integer from 1 to 4"),  # before: accepted
        ({"nexus": {"inner": "bogus"}}, r"nexus.inner must be one of"),
        ({"nexus": {"inner": "shared", "inner_init": "copy"}}, r"nexus.inner_init='copy' only applies"),
        ({"nexus": {"projections": "qx"}}, r"nexus.projections"),
        ({"nexus": {"ordr": 2}}, r"nexus.ordr \(did you mean nexus.order\?\)"),
        ({"nexus": {"inner_lr_multiplier": -1}}, r"nexus.inner_lr_multiplier must be a number > 0"),
        ({"nexus": {"inner_only_steps": 1.5}}, r"nexus.inner_only_steps must be an integer >= 0"),
        ({"nexus": [2]}, "nexus must be a mapping"),
        (
            {"dataset_mixture": {"datasets": [{"id": "x", "wieght": 0.5}]}},
            r"dataset_mixture.datasets\[0\]: \['wieght'\]",
        ),
        (
            {"dataset_mixture": {"datasets": [{"id": "x", "weight": 2}]}},
            r"dataset_mixture.datasets\[0\].weight must be",
        ),
        ({"model_name_or_path": None}, "model_name_or_path is required"),
        ({"dataset_name": None}, "dataset_name .*is required"),
        ({"dataset_max_dropped_share": 2}, r"dataset_max_dropped_share must be a number in \[0, 1\], got 2"),
        ({"dataset_max_dropped_share": "many"}, "dataset_max_dropped_share.*invalid float value: 'many'"),
    ],
)
def test_bad_recipes_name_the_key(recipe, change, message):
    with pytest.raises(RecipeError, match=message):
        run_training({**recipe, **change})


DUPLICATE_KEYS = [  # YAML text appended to a valid recipe -> (key, first line, second line) named in the error
    pytest.param("learning_rate: 2.0e-5\n", "learning_rate", id="learning-rate-twice"),
    pytest.param("warmup_steps: 1\nwarmup_steps: 2\n", "warmup_steps", id="adjacent-lines"),
    pytest.param("nexus:\n  order: 2\n  order: 3\n", "order", id="in-the-nexus-block"),
    pytest.param("env:\n  WANDB_PROJECT: a\n  WANDB_PROJECT: b\n", "WANDB_PROJECT", id="in-the-env-block"),
]


@pytest.mark.parametrize("extra,key", DUPLICATE_KEYS)
def test_a_key_stated_twice_is_an_error(recipe, tmp_path, extra, key):
    text = yaml.safe_dump(recipe, sort_keys=False) + extra
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith(f"{key}:")]
    assert len(lines) == 2
    with pytest.raises(RecipeError) as e:
        parse_recipe(path)
    assert str(e.value).startswith(f"recipe {path}: duplicate key '{key}' on lines {lines[0]} and {lines[1]}")


def test_unknown_override_names_the_key(recipe):
    with pytest.raises(RecipeError, match=r"'max_stepz' \(did you mean 'max_steps'\?\)"):
        parse_recipe(recipe, ["--max_stepz", "3"])
    with pytest.raises(RecipeError, match="nexus.order must be an integer"):
        parse_recipe(recipe, ["--nexus.order", "two"])


COMMAND_LINE_CASES = [  # argv over the tiny recipe -> (where, field, value) read back from the parsed recipe
    (["--max_steps", "9"], "training", "max_steps", 9),
    (["--max_steps=9"], "training", "max_steps", 9),
    (["--max-steps", "9"], "training", "max_steps", 9),  # argparse's dashed alias
    (["--packing"], "training", "packing", True),
    (["--bf16", "no"], "training", "bf16", False),
    (["--max_seq_length", "128"], "training", "max_length", 128),  # open-r1's old name, noted
    (["--warmup_ratio", "0.1"], "training", "warmup_steps", 0.1),
    (["--nexus.order", "3"], "nexus", "order", 3),
    (["--nexus.inner_lr_multiplier", "0.5"], "nexus", "inner_lr_multiplier", 0.5),
    (["--nexus.inner", "shared", "--nexus.gate=none"], "nexus", "gate", "none"),
]


@pytest.mark.parametrize("argv,where,name,value", COMMAND_LINE_CASES)
def test_command_line_overrides(recipe, argv, where, name, value):
    parsed = parse_recipe(recipe, argv)
    assert getattr(getattr(parsed, where), name) == value
    if where == "training":  # set explicitly, so kept in the saved recipe; an untouched default is not
        assert parsed.values[name] == value and "logging_dir" not in parsed.values
    if argv[0] in ("--max_seq_length", "--warmup_ratio"):
        assert [n for n in parsed.notes if f"`{argv[0][2:]}` is" in n] != []


BAD_COMMAND_LINES = [
    (["--max_stepz", "3"], r"'max_stepz' \(did you mean 'max_steps'\?\)"),
    (["--benchmarks", "math_500"], "'benchmarks' is an open-r1 setting"),
    (["3"], "override '3' is not of the form --key value"),
    (["--max_steps", "three"], "--max_steps.*invalid int value: 'three'"),
    (["--warmup_ratio", "3"], r"warmup_ratio must be in \[0, 1\)"),
    (["--nexus.order", "two"], "nexus.order must be an integer, got 'two'"),
    (["--nexus.order", "0"], "nexus.order must be an integer from 1 to 4"),
    (["--nexus.ordr", "2"], r"'nexus.ordr'"),
    (["--nexus.order"], "--nexus.order: expected one argument"),
    (["--nexus", "maybe"], "--nexus: invalid choice: 'maybe'"),
    (["--nexus", "none", "--nexus.order", "3"], "--nexus none runs the baseline"),
    (["--load_in_4bit", "true"], "load_in_4bit is not supported"),
]


@pytest.mark.parametrize("argv,message", BAD_COMMAND_LINES)
def test_bad_command_lines_name_the_key(recipe, argv, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**recipe, "nexus": NEXUS}, argv)


def test_missing_dataset_names_the_key_and_the_path(recipe, tmp_path):
    missing = tmp_path / "nowhere" / "chat.jsonl"
    with pytest.raises(RecipeError, match=f"dataset_name: no such file or folder: {missing}"):
        run_training({**recipe, "dataset_name": str(missing)})
    with pytest.raises(RecipeError, match=r"dataset_mixture.datasets\[1\].id: no such file"):
        run_training(
            {
                **recipe,
                "dataset_mixture": {"datasets": [{"id": recipe["dataset_name"]}, {"id": "./gone.parquet"}]},
            }
        )


def test_dataset_without_known_columns_is_refused(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(RecipeError, match=r"`messages` column .* found \['answer', 'question'\]"):
        run_training({**recipe, "dataset_name": str(bad)})


def test_nexus_block_conflicting_with_a_nexus_model(recipe, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = tmp_path / "nexus-model"
    convert(AutoModelForCausalLM.from_pretrained(tiny_model_dir), NexusConfig(**NEXUS)).save_pretrained(
        converted
    )
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(converted)
    with pytest.raises(
        RecipeError, match=r"already a Nexus model with other settings \(nexus.order: recipe 3, model 2\)"
    ):
        run_training({**recipe, "model_name_or_path": str(converted), "nexus": {"order": 3}})
    # stating the model's own settings (or only the training knobs) is fine: it trains as is
    result = run_training(
        {
            **recipe,
            "model_name_or_path": str(converted),
            "max_steps": 2,
            "nexus": {"order": 2, "inner_lr_multiplier": 2.0},
        }
    )
    assert result.nexus["order"] == 2 and result.nexus["inner_lr_multiplier"] == 2.0


def test_dataset_mixture_and_prompt_completion_data(recipe, tmp_path):
    pc = tmp_path / "pc.parquet"
    import datasets

    datasets.Dataset.from_list(
        [{"prompt": f"{i} plus 1 is", "completion": f" {i + 1}."} for i in range(16)]
    ).to_parquet(pc)
    mixture = {
        "datasets": [{"id": str(pc), "columns": ["prompt", "completion"], "weight": 0.5}],
        "seed": 3,
        "test_split_size": 2,
    }
    result = run_training({**recipe, "dataset_name": None, "dataset_mixture": mixture, "max_steps": 2})
    assert len(result.losses) == 2


@pytest.mark.parametrize("path", SFT_RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_shipped_recipes_parse(path):
    parsed = parse_recipe(path, CPU)
    t = parsed.training
    lora = path.stem.endswith("_lora")  # LoRA trains at a higher rate than full fine-tuning
    assert t.learning_rate == (1e-4 if lora else 4e-5) and parsed.model.use_peft == lora
    assert t.lr_scheduler_type == "cosine_with_min_lr" and t.warmup_steps == 0.03
    assert t.bf16 and t.gradient_checkpointing and t.use_liger_kernel
    assert (parsed.nexus is not None) == path.stem.startswith("config_nexus")
    tokenizer = build_tokenizer(["hello"])
    special = [
        t
        for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        if t in parsed.script.chat_template
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.chat_template = parsed.script.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], tokenize=False
    )
    assert "2" + t.eos_token in text


def test_baseline_and_nexus_recipes_differ_only_where_they_should():
    for folder in sorted({p.parent for p in SFT_RECIPES}):
        base = yaml.safe_load((folder / "config_baseline.yaml").read_text())
        nexus = yaml.safe_load((folder / "config_nexus.yaml").read_text())
        differ = {k for k in base.keys() | nexus.keys() if base.get(k) != nexus.get(k)}
        assert differ == {"nexus", "output_dir", "hub_model_id"}


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / "accelerate_configs" / f"{name}.yaml"))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "fsdp":
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # per-group learning rates under FSDP


def test_cli_reports_a_bad_recipe(recipe, tmp_path):
    import typer

    from nexus_retrofit.commands.train import CONTEXT_SETTINGS, train

    app = typer.Typer()
    app.command("train", context_settings=CONTEXT_SETTINGS)(train)
    app.command("noop")(lambda: None)  # two commands, so `train` is a subcommand as in the real CLI
    path = _write(tmp_path, recipe)
    result = CliRunner().invoke(app, ["train", str(path), "--nexus.order", "0"])
    assert result.exit_code == 2
    assert "nexus.order must be an integer from 1 to 4" in result.output
