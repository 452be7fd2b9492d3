"""The demo's generated data: deterministic, disjoint between splits, and arithmetically right."""

from __future__ import annotations

import re

import pytest

from nexus_retrofit.demo import eval_data_path, sft_data_path
from nexus_retrofit.demo.arithmetic import (
    EVAL_SEED,
    EVAL_SIZE,
    FINAL_LINE,
    KINDS,
    MATH_PROMPT,
    SFT_SEED,
    SFT_SIZE,
    SINGLE_STEP,
    TWO_STEP,
    eval_problems,
    generate_problems,
    held_out_texts,
    read_jsonl,
    sft_problems,
    to_math_row,
    to_messages,
    write_datasets,
)
from nexus_retrofit.evaluation.answers import last_boxed

STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_deterministic_and_seeded(kind):
    first = generate_problems(200, kind, seed=7)
    assert first == generate_problems(200, kind, seed=7)
    assert [p.text for p in first] != [p.text for p in generate_problems(200, kind, seed=8)]
    assert len({p.text for p in first}) == 200  # deduplicated
    assert generate_problems(50, kind, seed=7) == first[:50]  # a smaller set is a prefix


def test_exclude_is_honoured():
    excluded = {p.text for p in generate_problems(300, SINGLE_STEP, seed=3)}
    again = generate_problems(300, SINGLE_STEP, seed=3, exclude=excluded)
    assert not excluded & {p.text for p in again}


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown kind"):
        generate_problems(1, "three_step", seed=0)


def test_write_datasets_is_byte_identical(tmp_path):
    a = write_datasets(tmp_path / "a", eval_size=20, sft_size=30)
    b = write_datasets(tmp_path / "b", eval_size=20, sft_size=30)
    for key in ("sft", "eval"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert len(read_jsonl(a["eval"])) == 40 and len(read_jsonl(a["sft"])) == 30
    assert not list(tmp_path.glob("*/.*"))  # no temp files left behind


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    fresh = write_datasets(tmp_path)
    assert fresh["eval"].read_bytes() == eval_data_path().read_bytes()
    assert fresh["sft"].read_bytes() == sft_data_path().read_bytes()


def test_splits_are_disjoint():
    assert len({EVAL_SEED, SFT_SEED, 0}) == 3
    evals = {p.text for p in eval_problems()}
    sft = {p.text for p in sft_problems()}
    assert len(evals) == 2 * EVAL_SIZE and len(sft) == SFT_SIZE
    assert not evals & sft
    assert held_out_texts() == evals | sft
    # the build script's pretraining corpus (seed 0) excludes both
    for kind in KINDS:
        corpus = {p.text for p in generate_problems(2000, kind, seed=0, exclude=held_out_texts())}
        assert not corpus & (evals | sft)


def test_shipped_files_have_the_right_schema_and_sizes():
    evals, sft = read_jsonl(eval_data_path()), read_jsonl(sft_data_path())
    assert [r["level"] for r in evals].count(1) == EVAL_SIZE
    assert [r["level"] for r in evals].count(2) == EVAL_SIZE
    assert all(set(r) == {"problem", "solution", "answer", "subject", "level", "unique_id"} for r in evals)
    assert len({r["unique_id"] for r in evals}) == len(evals)
    assert len(sft) == SFT_SIZE
    for row in sft:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith(MATH_PROMPT)
        assert assistant["content"].endswith("I hope it is correct")
    problems = {r["messages"][0]["content"][len(MATH_PROMPT) :] for r in sft}
    assert not problems & {r["problem"] for r in evals}


def test_every_eval_answer_is_the_boxed_answer_and_right():
    for row in read_jsonl(eval_data_path()):
        *steps, last = row["solution"].split("\n")
        assert last == FINAL_LINE.format(answer=row["answer"])
        assert last_boxed(row["solution"]) == row["answer"]
        assert len(steps) == row["level"]
        previous = None
        for line in steps:
            left, op, right, result = STEP.match(line).groups()
            left, right, result = int(left), int(right), int(result)
            if op == "/":
                assert left % right == 0
            assert OPS[op](left, right) == result >= 0
            assert previous is None or left == previous  # the steps chain
            previous = result
        assert int(row["answer"]) == previous
        numbers = [int(n) for n in re.findall(r"\d+", row["problem"])]
        for line in steps:  # every operand comes from the problem or the previous step
            left, _, right, _ = STEP.match(line).groups()
            assert int(right) in numbers


def test_rows_render_one_problem_consistently():
    p = generate_problems(1, TWO_STEP, seed=11)[0]
    row, messages = to_math_row(p), to_messages(p)
    assert messages["messages"][0]["content"] == MATH_PROMPT + row["problem"]
    assert messages["messages"][1]["content"] == row["solution"]
    assert row["level"] == 2 and row["subject"] == "arithmetic"


def test_last_boxed():
    assert last_boxed("a $\\boxed{3}$ then $\\boxed{ 12 }$") == "12"
    assert last_boxed("no box") is None


def test_prompt_matches_the_eval_harness():
    """The model must see in training exactly the user message the eval harness sends."""
    from nexus_retrofit.evaluation.answers import MATH_PROMPT as HARNESS_PROMPT

    assert HARNESS_PROMPT.replace("{problem}", "PROBLEM") == MATH_PROMPT + "PROBLEM"
