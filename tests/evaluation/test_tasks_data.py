"""Task definitions, the registry, local data loading, column validation and the GPQA shuffle."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from nexus_retrofit.evaluation import MATH_PROMPT, Task, TaskError, get_task, register_task
from nexus_retrofit.evaluation.data import DataError, load_task_rows
from nexus_retrofit.evaluation.tasks import choice_permutation, load_task_file

from .conftest import GPQA_ROWS, MATH_ROWS, write_jsonl, write_parquet


def test_builtin_tasks_follow_the_design():
    math, aime, gpqa = get_task("math_500"), get_task("aime24"), get_task("gpqa_diamond")
    assert (math.dataset, math.split, math.num_samples) == ("HuggingFaceH4/MATH-500", "test", 4)
    assert (aime.dataset, aime.split, aime.num_samples) == ("HuggingFaceH4/aime_2024", "train", 64)
    assert (gpqa.dataset, gpqa.config, gpqa.split, gpqa.num_samples) == (
        "Idavidrein/gpqa",
        "gpqa_diamond",
        "train",
        8,
    )
    assert math.prompt.startswith("Solve the following math problem efficiently and clearly.  The last line")
    assert "$\\boxed{ANSWER}$. I hope it is correct' (without quotes)" in math.prompt
    assert gpqa.prompt.startswith(
        "Answer the following multiple choice question. The last line of your response"
    )
    assert "'Answer: $LETTER' (without quotes) where LETTER is one of ABCD." in gpqa.prompt


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError, match="unknown task 'math500'.*aime24.*gpqa_diamond.*math_500"):
        get_task("math500")


def test_math_problem_prompt_and_gold_fallback():
    task = get_task("math_500")
    problem = task.problem(MATH_ROWS[0], 0, seed=1)
    assert problem.prompt == MATH_PROMPT.replace("{problem}", MATH_ROWS[0]["problem"])
    assert problem.gold == "\\frac{5}{6}" and problem.id == "test/prealgebra/1.json"
    row = dict(MATH_ROWS[0], answer="")  # the boxed answer of the solution is the fallback gold
    assert task.problem(row, 0, seed=1).gold == "\\frac{5}{6}"


def test_task_definition_errors_name_the_field():
    with pytest.raises(TaskError, match=r"\{problem\}"):
        Task(
            name="t",
            dataset="x.jsonl",
            columns={"problem": "q", "answer": "a"},
            prompt="no placeholder",
            grader="math",
        )
    with pytest.raises(TaskError, match="missing \\['correct'\\]"):
        Task(
            name="t",
            dataset="x",
            columns={"question": "q", "incorrect": ["b"]},
            prompt="{question}{choices}",
            grader="multiple_choice",
        )
    with pytest.raises(TaskError, match="num_samples"):
        Task(
            name="t",
            dataset="x",
            columns={"problem": "q", "answer": "a"},
            prompt="{problem}",
            grader="math",
            num_samples=0,
        )


def test_register_task_refuses_a_silent_replacement():
    task = Task(
        name="reg_test",
        dataset="x.jsonl",
        columns={"problem": "q", "answer": "a"},
        prompt="{problem}",
        grader="math",
    )
    register_task(task)
    register_task(task)  # the same definition again is fine
    other = Task(
        name="reg_test",
        dataset="y.jsonl",
        columns={"problem": "q", "answer": "a"},
        prompt="{problem}",
        grader="math",
    )
    with pytest.raises(TaskError, match="already registered"):
        register_task(other)
    assert register_task(other, overwrite=True) is get_task("reg_test")


# ----------------------------------------------------------------------------------- GPQA shuffle
def test_gpqa_shuffle_is_deterministic_for_a_seed():
    task = get_task("gpqa_diamond")
    first = [task.problem(row, i, seed=7) for i, row in enumerate(GPQA_ROWS)]
    again = [task.problem(row, i, seed=7) for i, row in enumerate(GPQA_ROWS)]
    assert first == again
    # keyed by the question, not its position: --limit and row order do not change it
    assert task.problem(GPQA_ROWS[3], 0, seed=7).prompt == first[3].prompt
    orders = {s: [choice_permutation(f"question {i}", 4, s) for i in range(20)] for s in (7, 8)}
    assert orders[7] != orders[8]


def test_gpqa_gold_letter_points_at_the_correct_answer():
    task = get_task("gpqa_diamond")
    for i, row in enumerate(GPQA_ROWS):
        problem = task.problem(row, i, seed=3)
        lines = problem.prompt.splitlines()[-4:]
        assert [line[:3] for line in lines] == ["A) ", "B) ", "C) ", "D) "]
        assert f"{problem.gold}) {row['Correct Answer']}" in lines
        assert sorted(line[3:] for line in lines) == sorted(
            [
                row["Correct Answer"],
                row["Incorrect Answer 1"],
                row["Incorrect Answer 2"],
                row["Incorrect Answer 3"],
            ]
        )
        assert problem.prompt.startswith(task.prompt.split("{question}")[0] + row["Question"] + "\n\nA) ")


def test_gpqa_shuffle_is_unbiased_across_questions():
    n = 4800
    orders = [tuple(choice_permutation(f"Question number {i}?", 4, seed=1234)) for i in range(n)]
    gold_positions = Counter(order.index(0) for order in orders)
    expected = n / 4
    chi2_gold = sum((gold_positions[k] - expected) ** 2 / expected for k in range(4))
    assert chi2_gold < 16.27, gold_positions  # chi-square, 3 dof, p = 0.001
    perms = Counter(orders)
    assert set(perms) == set(itertools.permutations(range(4)))
    expected = n / 24
    chi2_perm = sum((perms[p] - expected) ** 2 / expected for p in perms)
    assert chi2_perm < 49.73, perms  # chi-square, 23 dof, p = 0.001


# ------------------------------------------------------------------------------------- local data
def test_local_jsonl_and_parquet_load_with_their_source(data_dir):
    rows, source = load_task_rows(get_task("math_500"), data_dir)
    assert rows == MATH_ROWS and source["kind"] == "local" and len(source["sha256"]) == 64
    rows, source = load_task_rows(get_task("gpqa_diamond"), data_dir)
    assert rows == GPQA_ROWS and source["path"].endswith("gpqa_diamond.parquet")


def test_missing_column_in_jsonl_is_named(data_dir):
    rows = [{("question" if k == "problem" else k): v for k, v in r.items()} for r in MATH_ROWS]
    write_jsonl(data_dir / "math_500.jsonl", rows)
    with pytest.raises(DataError, match="missing column 'problem'.*found \\[") as e:
        load_task_rows(get_task("math_500"), data_dir)
    assert "math_500.jsonl" in str(e.value)


def test_wrong_column_in_parquet_is_named_with_a_suggestion(data_dir):
    (data_dir / "gpqa_diamond.parquet").unlink()
    rows = [{("Correct answer" if k == "Correct Answer" else k): v for k, v in r.items()} for r in GPQA_ROWS]
    write_parquet(data_dir / "gpqa_diamond.parquet", rows)
    with pytest.raises(
        DataError, match="missing column 'Correct Answer' \\(did you mean 'Correct answer'\\?\\)"
    ):
        load_task_rows(get_task("gpqa_diamond"), data_dir)


def test_column_missing_in_a_later_row_is_named(data_dir):
    rows = [dict(r) for r in MATH_ROWS]
    del rows[2]["problem"]
    write_jsonl(data_dir / "math_500.jsonl", rows)
    with pytest.raises(DataError, match="row 2 is missing column 'problem'"):
        load_task_rows(get_task("math_500"), data_dir)


def test_data_dir_without_the_task_file(tmp_path):
    with pytest.raises(DataError, match="expected aime24.jsonl or aime24.parquet"):
        load_task_rows(get_task("aime24"), tmp_path)


def test_bad_json_line_is_reported_with_its_number(data_dir):
    (data_dir / "aime24.jsonl").write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_task_rows(get_task("aime24"), data_dir)


def test_task_file_defines_a_custom_task(tmp_path):
    write_jsonl(tmp_path / "arith.jsonl", [{"problem": "1+1", "solution": "\\boxed{2}", "answer": "2"}])
    spec = {
        "name": "arith_file",
        "dataset": "arith.jsonl",
        "split": "test",
        "columns": {"problem": "problem", "answer": "answer"},
        "prompt": "math",
        "grader": "math",
    }
    (tmp_path / "arith.yaml").write_text(json.dumps(spec))  # JSON is valid YAML
    (task,) = load_task_file(tmp_path / "arith.yaml")
    assert get_task("arith_file") is task and task.prompt == MATH_PROMPT
    rows, source = load_task_rows(task)
    assert rows[0]["answer"] == "2" and source["path"] == str((tmp_path / "arith.jsonl").resolve())
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "colums": {}}))
    with pytest.raises(TaskError, match="unknown Task field\\(s\\) \\['colums'\\]"):
        load_task_file(tmp_path / "bad.json")
