"""The runner: metrics, files, resume and configuration checks (scripted backend, no model)."""

from __future__ import annotations

import json
import re

import pytest

from nexus_retrofit.evaluation import MATH_PROMPT, EvalSettings, Task, evaluate, register_task, task_metrics
from nexus_retrofit.evaluation.samples import ResumeError, read_samples

from .conftest import MATH_ROWS, write_jsonl

ANSWERS = {row["problem"]: row["answer"] for row in MATH_ROWS}
FINAL = "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct"


def gold_of(prompt: str) -> str:
    return next(answer for problem, answer in ANSWERS.items() if problem in prompt)


def by_sample(prompt, seed, j):
    """Samples 0 and 1 right, 2 wrong, 3 without an answer; problem '7 * 6' always right."""
    gold = gold_of(prompt)
    if gold == "42" or j < 2:
        return FINAL.format(gold)
    return FINAL.format("-1") if j == 2 else "I give up."


def by_seed(prompt, seed, j):
    """Depends on the per-problem seed, as real sampling does."""
    return FINAL.format(gold_of(prompt)) if (seed + j) % 3 else "hmm"


def settings(model, data_dir, **kw):
    return EvalSettings(model=str(model), tasks=("math_500",), backend="hf", data_dir=str(data_dir), **kw)


def test_metrics_and_output_files(tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted):
    backend = scripted(tiny_tokenizer, by_sample)
    results = evaluate(
        settings(tiny_model_dir, data_dir), tmp_path / "out", backend=backend, show_progress=False
    )

    m = results["tasks"]["math_500"]
    per_problem = [0.5, 0.5, 0.5, 1.0]  # rows 0..3; row 3 is '7 * 6'
    mean = sum(per_problem) / 4
    se = (sum((s - mean) ** 2 for s in per_problem) / 3 / 4) ** 0.5
    assert m["pass@1"] == pytest.approx(mean) and m["stderr"] == pytest.approx(se)
    assert (m["n_problems"], m["n_samples"], m["complete"]) == (4, 4, True)
    assert m["extraction_failures"] == 3 and m["extraction_failure_rate"] == pytest.approx(3 / 16)

    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["complete"] and on_disk["tasks"]["math_500"]["pass@1"] == pytest.approx(mean)
    assert on_disk["settings"]["temperature"] == 0.6 and on_disk["settings"]["top_p"] == 0.95
    assert on_disk["settings"]["max_new_tokens"] == 32768 and on_disk["settings"]["batch_size"] == 8
    assert {"torch", "transformers", "math-verify", "nexus-retrofit", "vllm"} <= set(on_disk["versions"])
    assert on_disk["model"]["config"]["model_type"] == "qwen2" and on_disk["model"]["nexus"] is None
    dataset = on_disk["tasks"]["math_500"]["dataset"]
    assert dataset["kind"] == "local" and len(dataset["sha256"]) == 64
    assert on_disk["tasks"]["math_500"]["fingerprint"]["grader"]["math_verify"] == "0.9.0"

    lines = [
        json.loads(line) for line in (tmp_path / "out" / "samples_math_500.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 16
    first = lines[0]
    assert set(first) >= {
        "prompt",
        "completion",
        "extracted",
        "gold",
        "correct",
        "problem_index",
        "sample_index",
    }
    assert first["prompt"].startswith("<|im_start|>user\n" + MATH_PROMPT.split("{problem}")[0])
    assert first["gold"] == "\\frac{5}{6}" and first["correct"] and first["extracted"] == "\\frac{5}{6}"
    assert [r["extracted"] for r in lines if r["problem_index"] == 1][3] is None


def test_task_metrics_matches_hand_computation():
    rec = lambda ok, ext="x": {"correct": ok, "extracted": ext, "num_tokens": 10}  # noqa: E731
    m = task_metrics({0: [rec(True), rec(False)], 1: [rec(False, None), rec(False)]})
    assert m["pass@1"] == 0.25 and m["stderr"] == pytest.approx(0.25)
    assert (m["n_problems"], m["n_samples"], m["extraction_failures"]) == (2, 2, 1)


def test_resume_after_interrupt_gives_the_same_results(
    tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted
):
    s = settings(tiny_model_dir, data_dir, batch_size=1)
    full = evaluate(s, tmp_path / "a", backend=scripted(tiny_tokenizer, by_seed), show_progress=False)

    with pytest.raises(KeyboardInterrupt):
        evaluate(
            s, tmp_path / "b", backend=scripted(tiny_tokenizer, by_seed, fail_on_call=3), show_progress=False
        )
    partial = json.loads((tmp_path / "b" / "results.json").read_text())
    assert not partial["complete"] and not partial["tasks"]["math_500"]["complete"]
    assert (
        len((tmp_path / "b" / "samples_math_500.jsonl").read_text().splitlines()) == 2 * 4
    )  # 2 problems done

    resumed_backend = scripted(tiny_tokenizer, by_seed)
    resumed = evaluate(s, tmp_path / "b", backend=resumed_backend, show_progress=False)
    assert resumed_backend.calls == 2  # only the two unfinished problems
    assert resumed["tasks"]["math_500"]["pass@1"] == full["tasks"]["math_500"]["pass@1"]
    assert (tmp_path / "b" / "samples_math_500.jsonl").read_text() == (
        tmp_path / "a" / "samples_math_500.jsonl"
    ).read_text()


def test_torn_line_and_partial_problem_are_regenerated(
    tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted
):
    s = settings(tiny_model_dir, data_dir, batch_size=2)
    evaluate(s, tmp_path / "a", backend=scripted(tiny_tokenizer, by_seed), show_progress=False)
    reference = (tmp_path / "a" / "samples_math_500.jsonl").read_text()

    out = tmp_path / "b"
    evaluate(s, out, backend=scripted(tiny_tokenizer, by_seed), show_progress=False)
    lines = reference.splitlines(keepends=True)
    # problem 3 lost two samples and the write of the last one was torn mid-line
    (out / "samples_math_500.jsonl").write_text("".join(lines[:13]) + lines[13][:25])
    assert sorted(read_samples(out / "samples_math_500.jsonl", 4)) == [0, 1, 2]
    backend = scripted(tiny_tokenizer, by_seed)
    evaluate(s, out, backend=backend, show_progress=False)
    assert backend.calls == 1 and len(backend.generated[0]) == 2  # the whole fixed batch {2, 3}, same seeds
    assert (out / "samples_math_500.jsonl").read_text() == reference


def test_finished_run_is_rescored_without_a_backend(
    tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted
):
    s = settings(tiny_model_dir, data_dir)
    first = evaluate(s, tmp_path, backend=scripted(tiny_tokenizer, by_sample), show_progress=False)
    backend = scripted(tiny_tokenizer, by_sample)
    again = evaluate(s, tmp_path, backend=backend, show_progress=False)
    assert backend.calls == 0 and again["tasks"]["math_500"]["pass@1"] == first["tasks"]["math_500"]["pass@1"]


def test_different_settings_are_not_mixed(tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted):
    evaluate(
        settings(tiny_model_dir, data_dir),
        tmp_path,
        backend=scripted(tiny_tokenizer, by_sample),
        show_progress=False,
    )
    with pytest.raises(ResumeError, match=re.escape("temperature: 0.6 -> 1.0") + ".*--overwrite"):
        evaluate(
            settings(tiny_model_dir, data_dir, temperature=1.0),
            tmp_path,
            backend=scripted(tiny_tokenizer, by_sample),
        )
    with pytest.raises(ResumeError, match="math_500.num_samples: 4 -> 2"):
        evaluate(
            settings(tiny_model_dir, data_dir, num_samples=2),
            tmp_path,
            backend=scripted(tiny_tokenizer, by_sample),
        )
    write_jsonl(data_dir / "math_500.jsonl", MATH_ROWS[::-1])
    with pytest.raises(ResumeError, match="math_500.data"):
        evaluate(settings(tiny_model_dir, data_dir), tmp_path, backend=scripted(tiny_tokenizer, by_sample))

    results = evaluate(
        settings(tiny_model_dir, data_dir, num_samples=2),
        tmp_path,
        overwrite=True,
        backend=scripted(tiny_tokenizer, by_sample),
        show_progress=False,
    )
    assert results["tasks"]["math_500"]["n_samples"] == 2
    assert len((tmp_path / "samples_math_500.jsonl").read_text().splitlines()) == 8


def test_samples_without_results_are_not_adopted(
    tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted
):
    (tmp_path / "samples_math_500.jsonl").write_text("")  # not this tool's (no marker, no results.json)
    with pytest.raises(ValueError, match="not written by nexus-retrofit"):
        evaluate(settings(tiny_model_dir, data_dir), tmp_path, backend=scripted(tiny_tokenizer, by_sample))


def test_another_task_can_be_added_to_a_run(tmp_path, tiny_model_dir, tiny_tokenizer, data_dir, scripted):
    evaluate(
        settings(tiny_model_dir, data_dir),
        tmp_path,
        backend=scripted(tiny_tokenizer, by_sample),
        show_progress=False,
    )
    answer = lambda prompt, seed, j: "Answer: A"  # noqa: E731
    s = EvalSettings(model=str(tiny_model_dir), tasks=("gpqa_diamond",), backend="hf", data_dir=str(data_dir))
    results = evaluate(s, tmp_path, backend=scripted(tiny_tokenizer, answer), show_progress=False)
    assert set(results["tasks"]) == {"math_500", "gpqa_diamond"}
    assert results["tasks"]["gpqa_diamond"]["extraction_failures"] == 0


def test_custom_task_in_user_code(tmp_path, tiny_model_dir, tiny_tokenizer, scripted):
    """The demo's arithmetic task: a local jsonl in the MATH-500 schema, graded by math-verify."""
    rows = [
        {"problem": f"What is {a} + {b}?", "solution": f"\\boxed{{{a + b}}}", "answer": str(a + b)}
        for a, b in [(1, 2), (20, 22)]
    ]
    data = write_jsonl(tmp_path / "arith.jsonl", rows)
    register_task(
        Task(
            name="arith_test",
            dataset=str(data),
            split="test",
            columns={"problem": "problem", "answer": "answer", "solution": "solution"},
            prompt=MATH_PROMPT,
            grader="math",
            num_samples=1,
        ),
        overwrite=True,
    )

    def add(prompt, seed, j):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        return FINAL.format(a + b)

    s = EvalSettings(model=str(tiny_model_dir), tasks=("arith_test",), backend="hf")
    results = evaluate(s, tmp_path / "out", backend=scripted(tiny_tokenizer, add), show_progress=False)
    assert results["tasks"]["arith_test"]["pass@1"] == 1.0
    assert results["tasks"]["arith_test"]["dataset"]["path"] == str(data.resolve())


def test_settings_validation():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EvalSettings(model="m", limit=0)
    with pytest.raises(ValueError, match="top_p"):
        EvalSettings(model="m", top_p=0)
    with pytest.raises(ValueError, match="listed twice"):
        EvalSettings(model="m", tasks=("aime24", "aime24"))
