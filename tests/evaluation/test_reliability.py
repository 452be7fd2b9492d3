"""Reliability of `eval` and `compare`: nothing written before the inputs and the model check out,
results identify the model (no stale scores), malformed files are one-line errors naming the file
and the line, and runs with different settings are not compared silently.

Each table row is a case that went wrong before (the comment says how) and its expected outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nexus_retrofit.evaluation import EvalSettings, evaluate
from nexus_retrofit.evaluation.samples import ResumeError

from .conftest import _tiny_qwen2

FINAL = "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct"


def _args(model, data_dir, out, *extra):
    return ["eval", model, "--tasks", "aime24", "--backend", "hf", "--limit", "1", "--num-samples", "1",
            "--max-new-tokens", "2", "--data-dir", data_dir, "--output-dir", out, "--no-progress", *extra]  # fmt: skip


# --- 1. nothing is written before the inputs are validated and the model loaded ---------------------
# (what is wrong, extra args, message fragment). Before: a results.json stub was written first, so the
# corrected re-run was refused as "different settings" (and an output dir under a file was a traceback).
BAD_FIRST_RUN = [
    ("missing-model", {"model": "MISSING"}, [], "does not exist"),
    ("hf-with-tp", {}, ["--tp", "2"], "tensor/data parallel sizes apply to --backend vllm only"),
    ("out-under-file", {"out": "UNDER_FILE"}, [], "is under the file"),
]


@pytest.mark.parametrize("case, change, extra, message", BAD_FIRST_RUN, ids=[c[0] for c in BAD_FIRST_RUN])
def test_bad_run_writes_nothing_and_the_corrected_run_succeeds(
    cli, tiny_model_dir, data_dir, tmp_path, case, change, extra, message
):
    (tmp_path / "a_file").write_text("keep me")
    out = tmp_path / "out"
    model = str(tmp_path / "no" / "such" / "model") if change.get("model") else tiny_model_dir
    bad_out = tmp_path / "a_file" / "out" if change.get("out") else out
    result = cli(*_args(model, data_dir, bad_out, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and (tmp_path / "a_file").read_text() == "keep me"  # nothing written
    fixed = cli(*_args(tiny_model_dir, data_dir, out))
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((out / "results.json").read_text())["complete"]


# --- 2. results identify the model --------------------------------------------------------------------
def _answer(prompt, seed, j):
    return FINAL.format(42)


def _settings(model: Path, data_dir: Path) -> EvalSettings:
    return EvalSettings(model=str(model), tasks=("aime24",), backend="hf", data_dir=str(data_dir))


def _retrain(model: Path) -> None:
    """Same shapes and file sizes, other weights: what retraining into the same folder does."""
    from transformers import AutoTokenizer

    _tiny_qwen2(AutoTokenizer.from_pretrained(model), seed=1).save_pretrained(model)


def _edit_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["rope_theta"] = 1234.0
    (model / "config.json").write_text(json.dumps(config))


def _legacy_results(out: Path) -> None:
    """A results.json written before fingerprints existed."""
    data = json.loads((out / "results.json").read_text())
    del data["model"]["fingerprint"]
    (out / "results.json").write_text(json.dumps(data))


# (what changed, message fragment). Before: the resume reported the old scores without generating.
CHANGED = [
    ("retrained-weights", _retrain, "changed since (fingerprint"),
    ("edited-config", _edit_config, "changed since (fingerprint"),
    ("results-without-fingerprint", None, "without a model fingerprint"),
]


@pytest.mark.parametrize("case, change, message", CHANGED, ids=[c[0] for c in CHANGED])
def test_resume_refuses_when_the_model_changed(
    tiny_model_dir, tiny_tokenizer, data_dir, tmp_path, scripted, case, change, message
):
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    first = evaluate(
        _settings(model, data_dir), out, backend=scripted(tiny_tokenizer, _answer), show_progress=False
    )
    assert len(first["model"]["fingerprint"]["sha256"]) == 64
    if change is None:
        _legacy_results(out)
    else:
        change(model)
    before = (out / "results.json").read_text()
    backend = scripted(tiny_tokenizer, _answer)
    with pytest.raises(
        ResumeError, match=r"refusing to resume .*" + message.replace("(", r"\(") + ".*--overwrite"
    ):
        evaluate(_settings(model, data_dir), out, backend=backend, show_progress=False)
    assert backend.calls == 0 and (out / "results.json").read_text() == before  # nothing touched
    again = evaluate(_settings(model, data_dir), out, overwrite=True, backend=backend, show_progress=False)
    assert backend.calls == 1  # --overwrite starts over: the three problems are generated again
    assert (again["model"]["fingerprint"] != first["model"]["fingerprint"]) == (change is not None)


def test_a_copied_model_keeps_its_fingerprint(tiny_model_dir, tiny_tokenizer, data_dir, tmp_path, scripted):
    """Content, not dates: a copy (new mtimes) resumes; nothing is regenerated."""
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    evaluate(_settings(model, data_dir), out, backend=scripted(tiny_tokenizer, _answer), show_progress=False)
    shutil.rmtree(model)
    shutil.copytree(tiny_model_dir, model)
    backend = scripted(tiny_tokenizer, _answer)
    evaluate(_settings(model, data_dir), out, backend=backend, show_progress=False)
    assert backend.calls == 0


# --- 3. malformed files: one line naming the file and the line ----------------------------------------
@pytest.fixture
def finished(cli, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    assert cli(*_args(tiny_model_dir, data_dir, out)).exit_code == 0
    return out


def _task_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (case, file to write relative to the run folder or tmp, content, extra args, fragment). Before: a
# traceback (KeyError, TypeError, yaml.ScannerError) or a JSON message without the file's name.
MALFORMED = [
    ("results-not-json", "out/results.json", '{"format": "nexus-retrofit-eval/1",\n  oops\n}', [],
     "results.json line 2 is not valid JSON"),
    ("samples-line-not-object", "out/samples_aime24.jsonl", "KEEP\n[1, 2]\n", [],
     "samples_aime24.jsonl line 2 is a JSON list, not an object"),
    ("samples-line-missing-field", "out/samples_aime24.jsonl", '{"sample_index": 0}\n', [],
     "samples_aime24.jsonl line 1 has no 'problem_index' field"),
    ("task-file-bad-yaml", "tasks.yaml", "name: t\ncolumns: {problem: p,\n  answer: [\n", ["--task-file", "TASK"],
     "tasks.yaml line 4 is not valid YAML"),
    ("task-file-bad-json", "tasks.json", '{"name": "t",}', ["--task-file", "TASK"],
     "tasks.json line 1 is not valid JSON"),
    ("task-file-bad-field", "tasks.yaml", "- name: t1\n  colums: {}\n", ["--task-file", "TASK"],
     "tasks.yaml line 1: unknown Task field(s) ['colums']"),
]  # fmt: skip


@pytest.mark.parametrize("case, name, text, extra, message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_files_are_one_line_errors(
    cli, finished, tiny_model_dir, data_dir, tmp_path, case, name, text, extra, message
):
    path = tmp_path / name
    if "KEEP" in text:
        text = text.replace("KEEP", path.read_text().splitlines()[0])
    path.write_text(text)
    extra = [str(path) if e == "TASK" else e for e in extra]
    result = cli(*_args(tiny_model_dir, data_dir, finished, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert path.read_text() == text  # the file is reported, not rewritten


def test_compare_names_a_malformed_results_file(cli, tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"tasks": {}\n,,}')
    result = cli("compare", bad)
    assert result.exit_code == 2 and f"{bad} line 2 is not valid JSON" in result.output.replace("\n", "")


# --- 4. compare refuses runs whose settings differ ----------------------------------------------------
def _run(path: Path, settings: dict, num_samples: int = 4, n_problems: int = 10) -> Path:
    base = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 1234, "limit": 10,
            "num_samples": None, "system_prompt": None, "use_chat_template": True, "backend": "vllm",
            "dtype": "auto", "max_model_len": None}  # fmt: skip
    fingerprint = {
        "data": "abc",
        "num_samples": num_samples,
        "n_problems": n_problems,
        "grader": {"name": "math"},
    }
    task = {"pass@1": 0.5, "stderr": 0.02, "n_problems": n_problems, "n_samples": num_samples,
            "extraction_failure_rate": 0.0, "fingerprint": fingerprint}  # fmt: skip
    path.mkdir(parents=True)
    data = {"format": "nexus-retrofit-eval/1", "complete": True, "model": {"path": str(path)},
            "settings": {**base, **settings}, "tasks": {"math_500": task}}  # fmt: skip
    (path / "results.json").write_text(json.dumps(data))
    return path


# (how the second run differs, message fragment). Before: deltas were printed without a word.
MISMATCH = [
    ("limit", {"limit": 20}, {}, "limit: base=10, nexus=20"),
    ("temperature", {"temperature": 1.0}, {}, "temperature: base=0.6, nexus=1.0"),
    ("samples", {}, {"num_samples": 8}, "math_500.num_samples: base=4, nexus=8"),
    ("max-new-tokens", {"max_new_tokens": 1024}, {}, "max_new_tokens: base=32768, nexus=1024"),
]


@pytest.mark.parametrize("case, settings, task, message", MISMATCH, ids=[c[0] for c in MISMATCH])
def test_compare_refuses_runs_with_different_settings(cli, tmp_path, case, settings, task, message):
    base = _run(tmp_path / "base", {})
    other = _run(tmp_path / "nexus", settings, **task)
    refused = cli("compare", base, other)
    assert refused.exit_code == 2 and message in refused.output.replace("\n", "")
    assert "--allow-mismatch" in refused.output and "| Model |" not in refused.stdout
    shown = cli("compare", base, other, "--allow-mismatch")
    assert shown.exit_code == 0
    assert (
        shown.stdout.startswith("**WARNING: these runs used different settings") and message in shown.stdout
    )


def test_compare_accepts_runs_alike(cli, tmp_path):
    result = cli("compare", _run(tmp_path / "base", {}), _run(tmp_path / "nexus", {}))
    assert result.exit_code == 0 and result.stdout.startswith("| Model |")


def test_compare_plot_under_a_file_fails_first(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    result = cli("compare", _run(tmp_path / "base", {}), "--plot", tmp_path / "f" / "plot.png")
    assert result.exit_code == 2 and "is under the file" in result.output and "| Model |" not in result.stdout


# --- 6. the hostile round's eval and grade cases ---------------------------------------------------
# (what is wrong, how to make it, extra args, message fragment). Before: a traceback (samples torn
# inside a character, a bare JSON number), or 4 identical greedy samples reported as independent.
HOSTILE_EVAL = [
    (
        "greedy-n4",
        None,
        ["--num-samples", "4", "--temperature", "0"],
        "greedy decoding gives identical samples",
    ),
]


@pytest.mark.parametrize("case, make, extra, message", HOSTILE_EVAL, ids=[c[0] for c in HOSTILE_EVAL])
def test_hostile_eval_inputs_are_one_line(
    cli, tiny_model_dir, data_dir, tmp_path, case, make, extra, message
):
    out = tmp_path / "out"
    result = cli(*_args(tiny_model_dir, data_dir, out), *extra)  # the row's options come last and win
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_samples_file_torn_inside_a_character_resumes(cli, tiny_model_dir, data_dir, tmp_path):
    """A run killed mid-write inside a multi-byte character: the torn line is dropped on resume (before:
    UnicodeDecodeError naming no file)."""
    out = tmp_path / "out"
    assert cli(*_args(tiny_model_dir, data_dir, out)).exit_code == 0
    samples = out / "samples_aime24.jsonl"
    samples.write_bytes(samples.read_bytes() + '{"completion": "é'.encode()[:-1])  # torn in the é
    again = cli(*_args(tiny_model_dir, data_dir, out))
    assert again.exit_code == 0, again.output
    assert samples.read_bytes().endswith(b"\n")


def test_a_non_utf8_samples_line_names_the_file_and_line(tmp_path):
    from nexus_retrofit.evaluation.runner import read_samples

    path = tmp_path / "samples_aime24.jsonl"
    path.write_bytes(b'{"a": "\xff"}\n{"b": 1}\n')
    with pytest.raises(ResumeError, match=r"samples_aime24.jsonl line 1 is not UTF-8"):
        read_samples(path, 1, repair=False)


GRADE_LINES = [  # (what is wrong, the file's bytes, message fragment). Before: TypeError traceback.
    ("bare-number", b"7\n", "line 1 is a JSON int, not an object"),
    ("list", b"[1, 2]\n", "line 1 is a JSON list, not an object"),
    ("not-utf8", b'{"completion": "\xff", "gold": "1"}\n', "line 1 is not UTF-8"),
    ("no-gold", b'{"completion": "1"}\n', "samples.jsonl: line 1 has no 'gold'"),
]


@pytest.mark.parametrize("case, content, message", GRADE_LINES, ids=[c[0] for c in GRADE_LINES])
def test_grade_refuses_bad_lines_in_one_line(cli, tmp_path, case, content, message):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(content)
    result = cli("grade", "math_500", path)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
