"""Interrupted runs resume from the last checkpoint and continue exactly; output folders are guarded."""

from __future__ import annotations

import pytest

from nexus_retrofit.train import RecipeError, run_training
from tests.train.conftest import NEXUS


def test_resume_continues_from_the_saved_step(recipe, tmp_path):
    recipe = {**recipe, "nexus": NEXUS, "save_strategy": "steps", "save_steps": 2}
    straight = run_training({**recipe, "max_steps": 4, "output_dir": str(tmp_path / "straight")})

    first = run_training({**recipe, "max_steps": 2})  # "interrupted" after step 2
    out = first.output_dir
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()

    with pytest.raises(RecipeError, match="resume_from_checkpoint true"):
        run_training({**recipe, "max_steps": 4})  # same recipe, checkpoints present, no resume asked

    resumed = run_training({**recipe, "max_steps": 4}, ["--resume_from_checkpoint", "true"])
    assert resumed.resumed_from.endswith("checkpoint-2")
    # the log history carries over from the checkpoint, and the losses match the run never interrupted
    assert [step for step, _ in resumed.losses] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed.losses] == pytest.approx(
        [loss for _, loss in straight.losses], rel=1e-5
    )
    assert (out / "checkpoint-4").is_dir()


def test_resume_refuses_another_recipe(recipe):
    run_training({**recipe, "max_steps": 1, "save_strategy": "steps", "save_steps": 1, "nexus": NEXUS})
    with pytest.raises(RecipeError, match=r"different recipe.*nexus.order: 2 -> 3"):
        run_training(
            {**recipe, "max_steps": 2, "nexus": {**NEXUS, "order": 3}}, ["--resume_from_checkpoint", "true"]
        )
    with pytest.raises(RecipeError, match="nexus block: present -> absent"):
        run_training({**recipe, "max_steps": 2}, ["--resume_from_checkpoint", "true"])


def test_resume_without_a_checkpoint_names_the_key(recipe):
    with pytest.raises(RecipeError, match="resume_from_checkpoint: no checkpoint"):
        run_training(recipe, ["--resume_from_checkpoint", "true"])


def test_non_empty_output_dir_needs_overwrite(recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    with pytest.raises(RecipeError, match="output_dir .* is not empty.*--overwrite_output_dir"):
        run_training({**recipe, "max_steps": 1})
    result = run_training({**recipe, "max_steps": 1, "overwrite_output_dir": True})
    assert (result.output_dir / "model.safetensors").is_file()
    assert (out / "notes.txt").read_text() == "someone else's files"  # only checkpoints are removed
