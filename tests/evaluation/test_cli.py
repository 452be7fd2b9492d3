"""`compare`, `grade` and the error paths of `eval` through the real command line app."""

from __future__ import annotations

import json

from .conftest import MATH_ROWS, write_jsonl

FINAL = "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct"


def fake_results(path, model, scores, complete=True):
    tasks = {
        name: {"pass@1": p, "stderr": se, "n_problems": 10, "n_samples": 4, "extraction_failure_rate": 0.0}
        for name, (p, se) in scores.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "format": "nexus-retrofit-eval/1",
                "complete": complete,
                "model": {"path": model},
                "tasks": tasks,
            }
        )
    )
    return path


def test_compare_prints_table3_layout_with_deltas(cli, tmp_path):
    base = fake_results(
        tmp_path / "base" / "results.json",
        "/m/Qwen2.5-1.5B",
        {"math_500": (0.5, 0.02), "aime24": (0.1, 0.05), "gpqa_diamond": (0.3, 0.03)},
    )
    nexus = fake_results(
        tmp_path / "nexus" / "results.json",
        "/m/Qwen2.5-1.5B-Nexus",
        {"math_500": (0.55, 0.02), "aime24": (0.1, 0.05), "gpqa_diamond": (0.25, 0.03)},
    )
    result = cli("compare", base, nexus.parent, "--plot", tmp_path / "plot.png")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "| Model | MATH-500 | AIME24 | GPQA-Diamond | Average |"
    assert lines[2] == "| Qwen2.5-1.5B | 50.0 ± 2.0 | 10.0 ± 5.0 | 30.0 ± 3.0 | 30.0 |"
    assert (
        lines[3]
        == "| Qwen2.5-1.5B-Nexus | 55.0 ± 2.0 (+5.0) | 10.0 ± 5.0 (+0.0) | 25.0 ± 3.0 (-5.0) | 30.0 (+0.0) |"
    )
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_labels_missing_tasks_and_bad_files(cli, tmp_path):
    a = fake_results(tmp_path / "a.json", "a", {"math_500": (0.5, 0.0)})
    b = fake_results(tmp_path / "b.json", "b", {"gpqa_diamond": (0.4, 0.0)}, complete=False)
    result = cli("compare", a, b, "--labels", "base,nexus")
    assert result.exit_code == 0, result.output
    assert "| nexus | – | 40.0 ± 0.0 | – |" in result.stdout and "incomplete run" in result.stdout
    assert cli("compare", a, b, "--labels", "only-one").exit_code == 2
    missing = cli("compare", tmp_path / "nope.json")
    assert missing.exit_code == 2 and "no results file" in missing.output


def test_grade_json_rescores_saved_completions(cli, tmp_path):
    samples = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"completion": FINAL.format("\\dfrac{5}{6}"), "gold": "\\frac{5}{6}"},
            {"completion": FINAL.format("4"), "gold": "3"},
            {"completion": "no idea", "gold": "3", "extra": "ignored"},
            {"completion": "x = 3", "gold": "3"},
        ],
    )
    result = cli("grade", "math_500", samples, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"accuracy": 0.5, "correct": [True, False, False, True]}
    verbose = cli("grade", "math_500", samples)
    assert verbose.exit_code == 0
    assert (
        "3\tno answer" in verbose.stdout and "accuracy 0.5000 (2/4), extraction failures 1" in verbose.stdout
    )


def test_grade_gpqa_uses_the_gold_letter(cli, tmp_path):
    samples = write_jsonl(
        tmp_path / "g.jsonl",
        [{"completion": "Answer: B", "gold": "B"}, {"completion": "Answer: C", "gold": "B"}],
    )
    result = cli("grade", "gpqa_diamond", samples, "--json")
    assert json.loads(result.stdout) == {"accuracy": 0.5, "correct": [True, False]}


def test_grade_errors(cli, tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "gold": "1"}])
    result = cli("grade", "math_500", samples)
    assert result.exit_code == 2 and "line 1 has no 'completion' field" in result.output
    result = cli("grade", "no_such_task", samples)
    assert result.exit_code == 2 and "unknown task 'no_such_task'" in result.output


def test_grade_with_a_task_file(cli, tmp_path):
    (tmp_path / "arith.json").write_text(
        json.dumps(
            {
                "name": "arith_cli",
                "dataset": "arith.jsonl",
                "columns": {"problem": "problem", "answer": "answer"},
                "prompt": "math",
                "grader": "math",
            }
        )
    )
    samples = write_jsonl(tmp_path / "s.jsonl", [{"completion": FINAL.format(7), "gold": "7"}])
    result = cli("grade", "arith_cli", samples, "--json", "--task-file", tmp_path / "arith.json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["correct"] == [True]


def test_eval_bad_column_exits_2_naming_the_column(cli, tmp_path, data_dir):
    rows = [{("Problem" if k == "problem" else k): v for k, v in r.items()} for r in MATH_ROWS]
    write_jsonl(data_dir / "math_500.jsonl", rows)
    result = cli(
        "eval",
        "no/model-needed",
        "--tasks",
        "math_500",
        "--backend",
        "hf",
        "--data-dir",
        data_dir,
        "--output-dir",
        tmp_path / "o",
    )
    assert result.exit_code == 2
    assert "missing column 'problem' (did you mean 'Problem'?)" in result.output
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_eval_unknown_task_and_bad_options_exit_2(cli, tmp_path, data_dir):
    result = cli("eval", "m", "--tasks", "math500", "--data-dir", data_dir, "--output-dir", tmp_path)
    assert result.exit_code == 2 and "known tasks:" in result.output
    result = cli(
        "eval", "m", "--tasks", "aime24", "--backend", "tpu", "--data-dir", data_dir, "--output-dir", tmp_path
    )
    assert result.exit_code == 2 and "--backend must be vllm or hf" in result.output
    result = cli("eval", "m", "--tasks", "aime24", "--top-p", "1.5", "--output-dir", tmp_path)
    assert result.exit_code == 2 and "top_p" in result.output


def test_eval_refuses_a_different_configuration(cli, tiny_model_dir, data_dir, tmp_path):
    args = ["eval", tiny_model_dir, "--tasks", "aime24", "--backend", "hf", "--limit", "1", "--num-samples", "1",
            "--max-new-tokens", "2", "--data-dir", data_dir, "--output-dir", tmp_path, "--no-progress"]  # fmt: skip
    assert cli(*args).exit_code == 0
    changed = cli(*args, "--seed", "99")
    assert changed.exit_code == 2 and "seed: 1234 -> 99" in changed.output and "--overwrite" in changed.output
    assert cli(*args, "--seed", "99", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["seed"] == 99
