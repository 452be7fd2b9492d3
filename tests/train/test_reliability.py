"""Reliability of `train`: validation before any write, no secrets on disk, resume past torn
checkpoints, no previous model left beside a new recipe, no process group left behind.

Each table row is a case that went wrong before (the comment says how) and its expected outcome.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from nexus_retrofit.train import CONFIG_FILE, RecipeError, parse_recipe, run_training
from nexus_retrofit.train import run as run_module
from nexus_retrofit.train.recipe import REDACTED
from nexus_retrofit.train.trainer import NexusSFTTrainer
from tests.train.conftest import conversations

RECORD = run_module.RUN_RECORD


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _bad_role_data(tmp_path: Path) -> Path:
    rows = conversations(4)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "3"}]}
    return _jsonl(tmp_path / "bad_roles.jsonl", rows)


# --- 1. validation before any work or write --------------------------------------------------------
# (change to the recipe, message fragment). Before: max_steps 0 trained 1 step, -5 trained 3 epochs, an
# unknown role trained silently, an output_dir under a file failed with a traceback after loading.
INVALID = [
    ({"max_steps": 0}, "max_steps must be a positive number of optimizer steps, or -1"),
    ({"max_steps": -5}, "got -5"),
    ({"dataset_name": "BAD_ROLES"}, "bad_roles.jsonl line 3: unknown chat role 'asistant'"),
    ({"output_dir": "UNDER_FILE"}, "is under the file"),
]


@pytest.mark.parametrize(
    "change, message", INVALID, ids=["max_steps=0", "max_steps=-5", "role", "under-file"]
)
def test_invalid_input_fails_before_anything_is_written(recipe, tmp_path, change, message):
    (tmp_path / "a_file").write_text("keep me")
    subs = {"BAD_ROLES": str(_bad_role_data(tmp_path)), "UNDER_FILE": str(tmp_path / "a_file" / "run")}
    change = {k: subs.get(v, v) for k, v in change.items()}
    with pytest.raises(RecipeError, match=message):
        run_training({**recipe, **change})
    assert not Path(recipe["output_dir"]).exists()  # nothing written
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_bad_data_with_overwrite_keeps_the_old_checkpoints(recipe, tmp_path):
    """Before: overwrite_output_dir removed the checkpoints, then the data failed to load."""
    first = run_training({**recipe, "max_steps": 1, "save_strategy": "steps", "save_steps": 1})
    with pytest.raises(RecipeError, match="unknown chat role"):
        run_training(
            {**recipe, "dataset_name": str(_bad_role_data(tmp_path))}, ["--overwrite_output_dir", "true"]
        )
    assert (first.output_dir / "checkpoint-1" / "trainer_state.json").is_file()
    assert (first.output_dir / "model.safetensors").is_file()


# --- 2. secrets ----------------------------------------------------------------------------------
SECRETS = [
    ({"HF_TOKEN": "hf_SECRETvalue123"}, "HF_TOKEN"),
    ({"WANDB_API_KEY": "wandb-SECRET-456", "WANDB_PROJECT": "SECRET-project"}, "WANDB_API_KEY"),
]


@pytest.mark.parametrize("env, key", SECRETS, ids=["hf-token", "wandb"])
def test_env_values_are_never_written(recipe, monkeypatch, env, key):
    """Before: the env block was written verbatim into the run folder's nexus_train_config.yaml."""
    for name in env:
        monkeypatch.delenv(name, raising=False)
    result = run_training({**recipe, "max_steps": 1, "env": env})
    on_disk = "".join(p.read_text(errors="ignore") for p in result.output_dir.rglob("*") if p.is_file())
    assert "SECRET" not in on_disk
    saved = yaml.safe_load((result.output_dir / CONFIG_FILE).read_text())
    assert saved["env"] == {name: REDACTED for name in env}
    # the saved recipe runs again: a redacted value keeps the environment's, never the placeholder
    monkeypatch.setenv(key, "from-the-environment")
    again = parse_recipe(result.output_dir / CONFIG_FILE, ["--use_cpu", "true"])
    assert again.apply_env() == [] and os.environ[key] == "from-the-environment"


def test_parsing_a_recipe_sets_no_environment_variable(recipe, monkeypatch):
    """Parsing is side-effect free: the `env:` block takes effect when a run starts (apply_env)."""
    monkeypatch.delenv("NEXUS_TEST_VARIABLE", raising=False)
    parsed = parse_recipe({**recipe, "env": {"NEXUS_TEST_VARIABLE": "value-7f3a"}})
    assert "NEXUS_TEST_VARIABLE" not in os.environ and "value-7f3a" not in repr(parsed)
    parsed.apply_env()
    assert os.environ["NEXUS_TEST_VARIABLE"] == "value-7f3a"


# --- 3. resume past torn checkpoints -------------------------------------------------------------
def _tear(checkpoint: Path, how: str) -> None:
    if how == "no-state":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "half-optimizer":
        (checkpoint / "trainer_state.json").unlink()
        data = (checkpoint / "optimizer.pt").read_bytes()
        (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif how == "truncated-optimizer":
        data = (checkpoint / "optimizer.pt").read_bytes()
        (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif how == "truncated-weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) - 100])


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, chat_jsonl, tmp_path_factory):
    """A run stopped after step 2 with checkpoint-1 and checkpoint-2, copied per test."""
    from tests.train.conftest import make_recipe

    out = tmp_path_factory.mktemp("ckpt") / "run"
    recipe = make_recipe(tiny_model_dir, chat_jsonl, out, max_steps=2, save_strategy="steps", save_steps=1)
    run_training(recipe)
    return recipe, out


# (how checkpoint-2 is torn, what the skip note says). Before: resume took checkpoint-2 regardless and
# failed with a traceback (or ran from a state it could not read).
TORN = [
    ("no-state", "checkpoint-2 (no trainer_state.json)"),
    ("half-optimizer", "checkpoint-2 (no trainer_state.json)"),
    ("truncated-optimizer", "checkpoint-2 (optimizer.pt is truncated)"),
    ("truncated-weights", "checkpoint-2 (model.safetensors is truncated)"),
]


@pytest.mark.parametrize("how, skipped", TORN, ids=[t[0] for t in TORN])
def test_resume_takes_the_latest_complete_checkpoint(checkpointed, tmp_path, how, skipped):
    recipe, source = checkpointed
    out = tmp_path / "run"
    shutil.copytree(source, out)
    _tear(out / "checkpoint-2", how)
    result = run_training(
        {**recipe, "output_dir": str(out), "max_steps": 3}, ["--resume_from_checkpoint", "true"]
    )
    assert Path(result.resumed_from).name == "checkpoint-1"
    assert any(skipped in note for note in result.notes), result.notes
    assert [step for step, _ in result.losses] == [1, 2, 3]


# (checkpoint(s) to tear, resume value, message). Before: a traceback from the Trainer.
TORN_ONLY = [
    (
        ["checkpoint-1", "checkpoint-2"],
        "true",
        r"no complete checkpoint \(torn: checkpoint-2 \(no trainer_state",
    ),
    (["checkpoint-2"], "CKPT2", r"checkpoint-2 is incomplete \(no trainer_state.json\)"),
]


@pytest.mark.parametrize("torn, resume, message", TORN_ONLY, ids=["all-torn", "explicit-torn"])
def test_resume_refuses_a_torn_checkpoint(checkpointed, tmp_path, torn, resume, message):
    recipe, source = checkpointed
    out = tmp_path / "run"
    shutil.copytree(source, out)
    for name in torn:
        _tear(out / name, "no-state")
    resume = str(out / "checkpoint-2") if resume == "CKPT2" else resume
    with pytest.raises(RecipeError, match=message):
        run_training({**recipe, "output_dir": str(out), "max_steps": 3}, ["--resume_from_checkpoint", resume])
    assert (out / "checkpoint-1" / "optimizer.pt").is_file()  # nothing removed


# --- 4. an interrupted overwrite leaves no previous model beside the new recipe --------------------
class Interrupted(Exception):
    pass


def _interrupt(*args, **kwargs):
    raise Interrupted


# (how the folder was written, files that must survive). Before: the previous model.safetensors and
# config.json stayed beside the new recipe file, a folder that looked complete.
FOLDERS = [
    ("this-tool", ["notes.txt"]),
    ("this-tool-before-run-records", ["notes.txt"]),  # written by an earlier version: recipe file, no record
]


@pytest.mark.parametrize("origin, survive", FOLDERS, ids=[f[0] for f in FOLDERS])
def test_interrupted_overwrite_leaves_no_stale_model(recipe, monkeypatch, origin, survive):
    first = run_training({**recipe, "max_steps": 1})
    out = first.output_dir
    (out / "notes.txt").write_text("the user's")
    if origin == "this-tool-before-run-records":
        (out / RECORD).unlink()
    monkeypatch.setattr(NexusSFTTrainer, "train", _interrupt)  # killed during training
    with pytest.raises(Interrupted):
        run_training({**recipe, "max_steps": 2, "learning_rate": 1e-3, "overwrite_output_dir": True})
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert json.loads((out / RECORD).read_text())["complete"] is False
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["learning_rate"] == 1e-3
    for name in survive:
        assert (out / name).read_text() == "the user's"


def test_a_finished_run_records_its_files(recipe):
    result = run_training({**recipe, "max_steps": 1})
    record = json.loads((result.output_dir / RECORD).read_text())
    assert record["complete"] is True
    assert {"model.safetensors", "config.json", CONFIG_FILE, "tokenizer.json"} <= set(record["files"])


# --- 5. the process group ends with the run --------------------------------------------------------
def _init_group(path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


# (how the run ends, expected exception). Before: `trainer.end()` was reached only on success, so a run
# that failed or was interrupted left its group behind (its destructor can hang at interpreter exit).
GROUP_CASES = [("missing-data", RecipeError), ("interrupted", Interrupted)]


@pytest.mark.parametrize("how, error", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_process_group_created_by_the_run_is_destroyed(recipe, tmp_path, monkeypatch, how, error):
    setup = run_module._setup_logging

    def setup_and_join(training):  # what `accelerate launch` does: the group appears during the run
        _init_group(tmp_path / "pg")
        setup(training)

    monkeypatch.setattr(run_module, "_setup_logging", setup_and_join)
    if how == "interrupted":
        monkeypatch.setattr(NexusSFTTrainer, "train", _interrupt)
    change = {"dataset_name": str(tmp_path / "missing.jsonl")} if how == "missing-data" else {}
    try:
        with pytest.raises(error):
            run_training({**recipe, **change})
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_process_group_is_destroyed_after_a_finished_run(recipe, tmp_path, monkeypatch):
    setup = run_module._setup_logging
    monkeypatch.setattr(run_module, "_setup_logging", lambda t: (_init_group(tmp_path / "pg"), setup(t)))
    run_training({**recipe, "max_steps": 1})
    assert not dist.is_initialized()


def test_a_callers_process_group_is_left_alone(recipe, tmp_path):
    _init_group(tmp_path / "pg")
    try:
        run_training({**recipe, "max_steps": 1})
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
