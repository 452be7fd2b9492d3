"""Task rows and task files refused before anything runs: GPQA rows whose choices are empty or equal,
and task files that state a key twice (YAML and JSON)."""

from __future__ import annotations

import json

import pytest

from nexus_retrofit.evaluation import TaskError, get_task
from nexus_retrofit.evaluation.data import DataError, load_task_rows
from nexus_retrofit.evaluation.tasks import load_task_file

from .conftest import GPQA_ROWS, write_jsonl, write_parquet

# one bad row (row 2 of 4) -> the columns named in the error
BAD_CHOICES = [
    pytest.param(
        {"Correct Answer": "4", "Incorrect Answer 3": "4"},
        r"'Correct Answer' and 'Incorrect Answer 3' are both '4'",
        id="gold-equals-a-distractor",
    ),
    pytest.param(
        {"Incorrect Answer 1": "4", "Incorrect Answer 2": " 4 "},
        r"'Incorrect Answer 1' and 'Incorrect Answer 2' are both '4'",
        id="two-distractors-equal-after-whitespace",
    ),
    pytest.param(
        {"Correct Answer": "a  b", "Incorrect Answer 1": "a\tb\n"},
        r"'Correct Answer' and 'Incorrect Answer 1' are both 'a b'",
        id="inner-whitespace-normalised",
    ),
    pytest.param(
        {"Incorrect Answer 2": ""}, r"choice column 'Incorrect Answer 2' is empty", id="empty-choice"
    ),
    pytest.param({"Correct Answer": "   "}, r"choice column 'Correct Answer' is empty", id="blank-gold"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("change,message", BAD_CHOICES)
def test_gpqa_rows_need_distinct_non_empty_choices(tmp_path, change, message, suffix):
    rows = [dict(r) for r in GPQA_ROWS]
    rows[2].update(change)
    path = tmp_path / f"gpqa_diamond{suffix}"
    (write_jsonl if suffix == ".jsonl" else write_parquet)(path, rows)
    with pytest.raises(DataError, match=message) as e:
        load_task_rows(get_task("gpqa_diamond"), tmp_path)
    text = str(e.value)
    assert str(path) in text and "row 2 (id 'rec2')" in text and "fix the row or remove it" in text
    assert "\n" not in text


def test_gpqa_rows_with_distinct_choices_load(tmp_path):
    rows = [dict(r) for r in GPQA_ROWS]
    rows[1]["Incorrect Answer 1"] = "Right 1"  # differs from "right 1" in case: a different choice
    write_jsonl(tmp_path / "gpqa_diamond.jsonl", rows)
    loaded, _ = load_task_rows(get_task("gpqa_diamond"), tmp_path)
    assert len(loaded) == 4


def test_a_problem_is_never_built_from_a_row_with_twin_choices():
    row = {**GPQA_ROWS[0], "Incorrect Answer 1": GPQA_ROWS[0]["Correct Answer"]}
    with pytest.raises(TaskError, match="row 0: choice columns 'Correct Answer' and 'Incorrect Answer 1'"):
        get_task("gpqa_diamond").problem(row, 0, seed=0)


TASK = {
    "name": "dup_task",
    "dataset": "arith.jsonl",
    "columns": {"problem": "problem", "answer": "answer"},
    "prompt": "math",
    "grader": "math",
}
# a task file's text -> (key, first line, second line) named in the error
DUPLICATE_KEYS = [
    pytest.param(
        "name: dup_task\nnum_samples: 4\ndataset: arith.jsonl\nnum_samples: 8\nprompt: math\ngrader: math\n"
        "columns: {problem: problem, answer: answer}\n",
        ".yaml",
        ("num_samples", 2, 4),
        id="yaml-num-samples-twice",
    ),
    pytest.param(
        "- name: dup_task\n  prompt: math\n  grader: math\n  dataset: arith.jsonl\n  columns:\n"
        "    problem: problem\n    answer: answer\n    problem: question\n",
        ".yaml",
        ("problem", 6, 8),
        id="yaml-nested-in-a-list",
    ),
    pytest.param(
        json.dumps(TASK, indent=1)[:-2] + ',\n "num_samples": 2,\n "num_samples": 3\n}',
        ".json",
        ("num_samples", 10, 11),
        id="json-num-samples-twice",
    ),
]


@pytest.mark.parametrize("text,suffix,expected", DUPLICATE_KEYS)
def test_a_task_file_key_stated_twice_is_an_error(tmp_path, text, suffix, expected):
    key, first, second = expected
    path = tmp_path / f"tasks{suffix}"
    path.write_text(text)
    with pytest.raises(TaskError) as e:
        load_task_file(path)
    assert str(e.value).startswith(f"task file {path}: duplicate key '{key}' on lines {first} and {second}")
