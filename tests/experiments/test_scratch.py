"""Experiment `scratch` (Tables 1-2 in miniature): the world's corpus and tasks, the recipe, a --quick run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from nexus_retrofit.experiments import scratch as S
from nexus_retrofit.experiments import scratch_world as W

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world():
    return W.build_world()


def test_the_world_is_deterministic(world):
    assert W.corpus(W.build_world()) == W.corpus(world)
    assert W.task_rows(W.build_world()) == W.task_rows(world)


def test_the_corpus_states_every_single_fact_and_no_held_out_answer(world):
    corpus = W.corpus(world)
    text = " ".join(corpus)
    for town in world.towns.values():
        assert f"The river {town.river} runs through {town.name}." in text
        assert f"Farmers near {town.name} grow {town.crop}." in text
    for name, country in world.countries.items():
        assert f"The capital of {name} is {country['capital']}." in text
    for task, rows in W.task_rows(world).items():
        for row in rows:
            answered = W.render(task, row, answered=True)
            if not row["held_out"]:  # the quizzes: every question about the other half, answered
                assert answered in text, (task, answered)
            elif task in W.TWO_FACTS:  # a composed answer about a held-out town: never in the corpus
                assert answered not in text and W.render(task, row) not in text, (task, answered)


def test_a_held_out_two_fact_answer_is_never_stated_together_with_its_town(world):
    text = " ".join(W.corpus(world))
    for row in W.task_rows(world)["world_arc_challenge"]:
        if row["held_out"]:
            town = _town(row["question"])
            capital = row["choices"][row["gold"]]
            assert f"{town} lies in the country whose capital is {capital}" not in text
            assert f"where {town} lies" not in text


@pytest.mark.parametrize("task", W.TASKS)
def test_every_task_row_has_one_right_answer_among_its_choices(world, task):
    rows = W.task_rows(world)[task]
    assert sum(r["held_out"] for r in rows) >= 24
    for row in rows:
        choices = row.get("choices") or row.get("endings") or row.get("options") or [row["sol1"], row["sol2"]]
        assert len(set(choices)) == len(choices) == (2 if task == "world_piqa" else 4)
        assert 0 <= row["gold"] < len(choices)


@pytest.mark.parametrize(
    "task,answer",
    [
        ("world_arc_easy", lambda w, r: w.towns[_town(r["question"])].river),
        ("world_arc_challenge", lambda w, r: w.countries[w.towns[_town(r["question"])].country]["capital"]),
        ("world_piqa", lambda w, r: w.countries[w.towns[_town(r["goal"])].country]["colour"]),
    ],
)
def test_the_gold_choice_is_the_worlds_fact(world, task, answer):
    for row in W.task_rows(world)[task]:
        choices = row.get("choices") or [row["sol1"], row["sol2"]]
        assert choices[row["gold"]] == answer(world, row)


def _town(text: str) -> str:
    return re.search(r"(?:through|where) (\w+)", text).group(1)


def test_task_yamls_are_lm_eval_multiple_choice_over_local_files(tmp_path, world):
    written = W.write_tasks(world, tmp_path)
    assert set(written) == set(W.TASKS)
    for name, path in written.items():
        config = yaml.safe_load(path.read_text())
        assert config["task"] == name and config["output_type"] == "multiple_choice"
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        held_out = [r for r in W.task_rows(world)[name] if r["held_out"]]
        assert data.is_file() and [json.loads(x) for x in data.read_text().splitlines()] == held_out
        assert {m["metric"] for m in config["metric_list"]} == {"acc", "acc_norm"}


@pytest.mark.parametrize(
    "key",
    ["learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "adam_beta1", "adam_beta2", "adam_epsilon",
     "weight_decay", "max_grad_norm", "packing", "packing_strategy"],
)  # fmt: skip
def test_the_cpu_recipe_is_the_pythia_recipe_scaled_down(key):
    recipe = yaml.safe_load((REPO / "recipes/Pythia-70M/pretrain/config_baseline.yaml").read_text())
    assert S.RECIPE[key] == recipe[key]


def test_rows_cover_table_2_and_the_control():
    assert S.ROWS["baseline"] is None
    inner = {name: block["inner"] for name, block in S.ROWS.items() if block}
    assert set(inner.values()) == {"separate", "shared", "mlp"}
    assert {b["projections"] for b in S.ROWS.values() if b and b["inner"] == "separate"} == {"q", "qk", "qkv"}
    assert {b["order"] for b in S.ROWS.values() if b} == {2, 3}


@pytest.mark.slow
def test_quick_run_trains_through_init_and_train_and_scores_through_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    out = S.run(tmp_path / "out", quick=True, work_dir=tmp_path / "work")
    results = json.loads(out.json_path.read_text())
    assert set(results["runs"]) == set(S.QUICK.rows) and out.plot_path.stat().st_size > 0
    baseline, nexus = (results["runs"][r] for r in S.QUICK.rows)
    assert nexus["seeds"][0]["parameters"] > baseline["seeds"][0]["parameters"]
    assert nexus["training_flops"] > baseline["training_flops"] > 0
    init = json.loads((tmp_path / "work/init/nexus-qk-s0/init.json").read_text())
    assert init["nexus_block"]["gate"] == "none" and init["model_type"] == "gpt_neox"
    for data in results["runs"].values():
        for task in S.QUICK.tasks:
            score = data["seeds"][0]["scores"][task]
            correct = score["acc"] * S.QUICK.eval_limit  # a count of right answers out of eval_limit rows
            assert correct == pytest.approx(round(correct)) and 0 <= score["acc"] <= 1
    assert "| baseline |" in out.markdown_path.read_text()
