"""`eval --suite zero-shot`: lm-eval as the engine, the shipped offline task, resume and refusals, and
plain `lm_eval` on converted checkpoints (with the package importable and without it).

The model is the shipped tiny Qwen2 and its zero-gate conversion, scored in fp32 on the shipped
60-row arithmetic task (nexus_retrofit/assets/zero_shot): seconds per run, no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from nexus_retrofit.demo.assets import tiny_model_path  # noqa: E402
from nexus_retrofit.evaluation.zero_shot import (  # noqa: E402
    GENERATIVE,
    PAPER_TASKS,
    SHIPPED_TASKS,
    ZERO_SHOT,
    ZeroShotSettings,
    evaluate_zero_shot,
    route,
)

TASK = "nexus_tiny_arith"
GENERATIVE_TASKS = ("math_500", "aime24", "gpqa_diamond")


def write_task(folder: Path, name: str, rows_file: Path, **overrides) -> Path:
    """An lm-eval task YAML over a local jsonl (the offline route for any task)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {rows_file}}}}}",
        "output_type: multiple_choice",
        "test_split: test",
        'doc_to_text: "{{question}} ="',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        "metric_list: [{metric: acc}, {metric: acc_norm}]",
    ]
    for key, value in overrides.items():
        lines = [line for line in lines if not line.startswith(f"{key}:")] + [f"{key}: {value}"]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny model and its zero-gate conversion (which must score exactly alike)."""
    from typer.testing import CliRunner

    from nexus_retrofit.cli import app

    nexus = tmp_path_factory.mktemp("zs") / "nexus"
    made = CliRunner().invoke(app, ["convert", str(tiny_model_path()), str(nexus), "--gate", "zero"])
    assert made.exit_code == 0, made.output
    return {"base": tiny_model_path(), "nexus": nexus}


@pytest.fixture(scope="module")
def scored(models, tmp_path_factory) -> dict[str, dict]:
    """`nexus-retrofit eval MODEL --tasks nexus_tiny_arith --dtype float32` on both models (CLI, in-process)."""
    from typer.testing import CliRunner

    from nexus_retrofit.cli import app

    out = {}
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(f"scored-{name}")
        result = CliRunner().invoke(
            app, ["eval", str(model), "--tasks", TASK, "--dtype", "float32", "--output-dir", str(folder)]
        )
        assert result.exit_code == 0, result.output
        out[name] = json.loads((folder / "results.json").read_text())
        out[name]["_dir"] = folder
    return out


@pytest.fixture
def rows_file(tmp_path) -> Path:
    """A copy of the shipped task's rows, for task YAMLs of the tests' own."""
    return Path(shutil.copy(SHIPPED_TASKS / "tiny_arith.jsonl", tmp_path / "rows.jsonl"))


# ---------------------------------------------------------------------------------------- routing
ROUTES = [
    # (suite, --tasks, --task-dir given, expected (kind, names) or error fragment)
    (None, None, False, (GENERATIVE, GENERATIVE_TASKS)),
    ("generative", None, False, (GENERATIVE, GENERATIVE_TASKS)),
    ("zero-shot", None, False, (ZERO_SHOT, PAPER_TASKS)),
    ("zero-shot", ("arc_easy",), False, (ZERO_SHOT, ("arc_easy",))),
    (None, ("arc_challenge", "piqa"), False, (ZERO_SHOT, ("arc_challenge", "piqa"))),
    (None, ("math_500",), False, (GENERATIVE, ("math_500",))),
    (None, ("my_task",), True, (ZERO_SHOT, ("my_task",))),
    ("zero-shot", ("aime24",), False, (ZERO_SHOT, ("aime24",))),  # --suite picks lm-eval's aime24
    (None, ("math500",), False, (ZERO_SHOT, ("math500",))),  # an lm-eval name, or a typo lm-eval reports
    (None, ("math_500", "arc_easy"), False, "mixes generative tasks (math_500) with lm-eval zero-shot tasks (arc_easy)"),
    ("generative", None, True, "--task-dir holds lm-eval task YAMLs"),
    (None, ("math_500",), True, (ZERO_SHOT, ("math_500",))),  # --task-dir: lm-eval's names (yours)
    ("fewshot", None, False, "--suite must be one of generative, zero-shot, got 'fewshot'"),
]  # fmt: skip


@pytest.mark.parametrize("suite,tasks,dirs,expected", ROUTES)
def test_route(suite, tasks, dirs, expected):
    call = lambda: route(suite, tasks, ["d"] if dirs else [], GENERATIVE_TASKS)  # noqa: E731
    if expected == (ZERO_SHOT, ("math500",)):  # with --temperature, --data-dir ...: a generative typo
        assert route(suite, tasks, [], GENERATIVE_TASKS, generative_options=True) == (GENERATIVE, tasks)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=None) as error:
            call()
        assert expected in str(error.value)
    else:
        assert call() == expected


SETTINGS = [
    (dict(backend="tpu"), "--backend must be hf or vllm"),
    (dict(dtype="int8"), "--dtype must be auto, float32"),
    (dict(limit=0), "--limit must be >= 1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(tasks=("piqa", "piqa")), "listed twice"),
    (dict(tasks=()), "no tasks given"),
    (dict(task_dirs=("/nonexistent/tasks",)), "--task-dir /nonexistent/tasks is not a folder"),
]


@pytest.mark.parametrize("changes,fragment", SETTINGS)
def test_settings_are_checked(changes, fragment):
    with pytest.raises(ValueError) as error:
        ZeroShotSettings(model="m", **changes)
    assert fragment in str(error.value)


# ---------------------------------------------------------------------------- lm-eval's numbers
def test_eval_gives_lm_evals_own_numbers_on_base_and_converted(models, scored):
    """Our run and lm-eval's Python API run directly (model="hf") agree exactly; the zero-gate
    conversion scores exactly as its base model, document by document."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    direct = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(models["base"]), "dtype": "float32"},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(SHIPPED_TASKS), include_defaults=False),
        device="cpu",
        batch_size=8,
    )["results"][TASK]
    for name in ("base", "nexus"):
        entry = scored[name]["tasks"][TASK]
        assert entry["complete"] and entry["n_problems"] == 60
        assert (entry["acc"], entry["acc_norm"]) == (direct["acc,none"], direct["acc_norm,none"]), name
        assert entry["acc_stderr"] == direct["acc_stderr,none"]
        assert 0.25 < entry["acc"] <= 1.0  # the arithmetic-trained model is above chance
    samples = {
        name: [
            json.loads(line)
            for line in (scored[name]["_dir"] / f"samples_{TASK}.jsonl").read_text().splitlines()
        ]
        for name in ("base", "nexus")
    }
    assert [s["problem_index"] for s in samples["base"]] == list(range(60))
    for b, n in zip(samples["base"], samples["nexus"]):
        assert b["extracted"] == n["extracted"] and b["gold"] == n["gold"] and b["correct"] == n["correct"]
        assert n["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
    results = scored["nexus"]
    assert results["versions"]["lm-eval"] and results["settings"]["suite"] == ZERO_SHOT
    assert results["model"]["fingerprint"]["sha256"] and results["model"]["nexus"]["gate"] == "zero"
    assert results["tasks"][TASK]["fingerprint"]["grader"]["engine"] == "lm-eval"


def test_compare_and_the_model_card_read_zero_shot_results(models, scored, tmp_path):
    from nexus_retrofit.evaluation.compare import compare_table, settings_mismatches
    from nexus_retrofit.hub import PushError, build_model_card, check_results

    runs = [scored["base"], scored["nexus"]]
    assert settings_mismatches(runs, ["base", "nexus"]) == []
    table = compare_table(runs, ["base", "nexus"])
    acc = 100 * scored["base"]["tasks"][TASK]["acc"]
    assert f"| nexus | {acc:.1f} ± " in table and "(+0.0) |" in table and "acc (%)" in table
    check_results(scored["nexus"], "results.json", models["nexus"])
    card = str(build_model_card(models["nexus"], "me/tiny-nexus", results=scored["nexus"]))
    assert "| Benchmark (zero-shot) | acc (%)" in card and f"| {TASK} | {acc:.1f} |" in card
    assert "lm-evaluation-harness" in card and "acc (0-shot, lm-eval)" in card
    for key, value in (("acc", 1.5), ("acc_norm_stderr", float("nan"))):
        bad = json.loads(json.dumps({k: v for k, v in scored["nexus"].items() if k != "_dir"}))
        bad["tasks"][TASK][key] = value
        with pytest.raises(PushError, match=f"has {key} = "):
            check_results(bad, "results.json", models["nexus"])


# ------------------------------------------------------------------------- plain lm_eval, part 2
HIDE_PACKAGE = (
    "import sys, runpy; sys.modules['nexus_retrofit'] = None; sys.argv[0] = 'lm_eval'\n"
    "try:\n    runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)\n"
    "finally:\n    assert not any(m.startswith('nexus_retrofit.') for m in sys.modules), 'package imported'\n"
)
PLAIN = [
    # (model, run with the package importable?)
    pytest.param("base", True, id="base"),
    pytest.param("nexus", True, id="nexus-package-importable"),
    pytest.param("nexus", False, id="nexus-bundled-code-only"),
]


@pytest.mark.slow  # ~25 s each: lm_eval's start-up on 2 cores
@pytest.mark.parametrize("model,importable", PLAIN)
def test_plain_lm_eval_scores_our_checkpoints_as_the_base_model(models, scored, model, importable, tmp_path):
    """`lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True --include_path DIR --tasks T`,
    as a new user runs it, gives the numbers `eval` recorded for the base model."""
    args = [
        "--model", "hf", "--model_args", f"pretrained={models[model]},trust_remote_code=True,dtype=float32",
        "--include_path", str(SHIPPED_TASKS), "--tasks", TASK, "--device", "cpu", "--batch_size", "8",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    start = [sys.executable, "-m", "lm_eval"] if importable else [sys.executable, "-c", HIDE_PACKAGE]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = ""
    done = subprocess.run(start + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"][TASK]
    ours = scored["base"]["tasks"][TASK]
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    if model == "nexus":  # trust_remote_code ran the checkpoint's bundled modeling code
        assert list((tmp_path / "hf" / "modules" / "transformers_modules").rglob("modeling_nexus.py"))


# ------------------------------------------------------------------------------ resume, refusals
def test_an_interrupted_run_resumes_with_the_unfinished_tasks(models, rows_file, tmp_path, monkeypatch):
    import lm_eval

    dirs = (str(tmp_path / "tasks"),)
    write_task(tmp_path / "tasks", "second_task", rows_file, doc_to_text='"Q: {{question}} ="')
    settings = ZeroShotSettings(
        model=str(models["base"]), tasks=(TASK, "second_task"), dtype="float32", limit=12, task_dirs=dirs
    )
    real, calls = lm_eval.simple_evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["tasks"][0].task_name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_zero_shot(settings, tmp_path / "out")
    partial = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not partial["complete"] and partial["tasks"][TASK]["complete"]
    assert not partial["tasks"]["second_task"]["complete"] and "acc" not in partial["tasks"]["second_task"]

    calls.clear()
    monkeypatch.setattr(
        lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"][0].task_name) or real(*a, **k)
    )
    resumed = evaluate_zero_shot(settings, tmp_path / "out")
    assert calls == ["second_task"]  # the finished task is not run again
    assert resumed["complete"] and resumed["tasks"][TASK] == partial["tasks"][TASK]
    fresh = evaluate_zero_shot(settings, tmp_path / "fresh")
    for name in (TASK, "second_task"):
        assert resumed["tasks"][name]["acc"] == fresh["tasks"][name]["acc"]
        assert resumed["tasks"][name]["fingerprint"] == fresh["tasks"][name]["fingerprint"]
    first, second = (fresh["tasks"][name]["fingerprint"] for name in (TASK, "second_task"))
    assert first["data"] == second["data"] and first["task"] != second["task"]  # same rows, another prompt


def _change_limit(ctx):
    ctx["settings"] = ZeroShotSettings(**{**ctx["kwargs"], "limit": 5})


def _change_model(ctx):
    config = ctx["model"] / "generation_config.json"
    config.write_text(config.read_text().replace("{", '{"retrained": 1,', 1))


def _change_prompt(ctx):
    write_task(ctx["tasks"], "own_task", ctx["rows"], doc_to_text='"Compute {{question}} ="')


def _change_data(ctx):
    rows = ctx["rows"].read_text().splitlines()
    ctx["rows"].write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")


def _generative_run_there(ctx):
    (ctx["out"] / "results.json").write_text(
        json.dumps({"format": "nexus-retrofit-eval/1", "settings": {"temperature": 0.6}, "tasks": {}})
    )


REFUSALS = [
    (_change_limit, "holds a run with different settings (limit: 4 -> 5"),
    (_change_model, "changed since (fingerprint"),
    (_change_prompt, "own_task.task: "),
    (_change_data, "own_task.data: "),
    (_generative_run_there, "holds a run with different settings"),
]


@pytest.mark.parametrize("change,fragment", REFUSALS, ids=[c.__name__.strip("_") for c, _ in REFUSALS])
def test_a_rerun_of_another_configuration_is_refused_before_loading_the_model(
    change, fragment, models, rows_file, tmp_path, monkeypatch
):
    import nexus_retrofit.evaluation.zero_shot as zero_shot

    model = Path(shutil.copytree(models["base"], tmp_path / "model"))
    write_task(tmp_path / "tasks", "own_task", rows_file)
    kwargs = dict(
        model=str(model), tasks=("own_task",), dtype="float32", limit=4, task_dirs=(str(tmp_path / "tasks"),)
    )
    out = tmp_path / "out"
    evaluate_zero_shot(ZeroShotSettings(**kwargs), out)
    ctx = {"kwargs": kwargs, "settings": ZeroShotSettings(**kwargs), "model": model, "tasks": tmp_path / "tasks",
           "rows": rows_file, "out": out}  # fmt: skip
    change(ctx)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(zero_shot, "make_lm", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as error:
        evaluate_zero_shot(ctx["settings"], out)
    assert fragment in str(error.value) and "--overwrite" in str(error.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    again = evaluate_zero_shot(ctx["settings"], out, overwrite=True)
    assert again["complete"]


# ------------------------------------------------------------------------------------- bad input
def _offline(monkeypatch):
    import datasets
    import huggingface_hub.constants as constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _hub_task(tmp_path, rows):
    write_task(tmp_path / "tasks", "hub_task", rows, dataset_path="allenai/ai2_arc", dataset_name="ARC-Easy",
               dataset_kwargs="{}")  # fmt: skip
    return ["--tasks", "hub_task", "--task-dir", tmp_path / "tasks"]


def _missing_file(tmp_path, rows):
    write_task(tmp_path / "tasks", "file_task", tmp_path / "gone.jsonl")
    return ["--tasks", "file_task", "--task-dir", tmp_path / "tasks"]


def _not_multiple_choice(tmp_path, rows):
    write_task(tmp_path / "tasks", "gen_task", rows, output_type="generate_until",
               metric_list="[{metric: exact_match}]", doc_to_choice="null")  # fmt: skip
    return ["--tasks", "gen_task", "--task-dir", tmp_path / "tasks"]


BAD = [
    # (argv after MODEL, or a builder (tmp_path, rows) -> argv, fragment of the one error line)
    (["--tasks", "nexus_tiny_arit"], "unknown lm-eval task 'nexus_tiny_arit' (close: nexus_tiny_arith"),
    (["--suite", "zero-shot", "--tasks", "arc_chalenge"], "'arc_chalenge' (close: arc_challenge"),
    (_hub_task, "cannot load the dataset allenai/ai2_arc (ARC-Easy) (Couldn't reach"),
    (_missing_file, "gone.jsonl'} (Unable to find '/"),
    (_not_multiple_choice, "task gen_task reports exact_match, not acc"),
    (["--tasks", "math_500,nexus_tiny_arith"], "mixes generative tasks (math_500)"),
    (["--suite", "zero-shot", "--tasks", TASK, "--temperature", "0"], "--temperature is for generative tasks only"),
    (["--tasks", TASK, "--task-dir", ".", "--data-dir", "."], "--data-dir is for generative tasks only"),
    (["--suite", "zero-shot", "--top-p", "0.5", "--num-samples", "2"], "--num-samples, --top-p are for generative"),
    (["--tasks", "math500", "--data-dir", "."], "unknown task 'math500'; known tasks: aime24"),  # generative intent
    (["--tasks", TASK, "--backend", "vllm"], "vllm is not installed here"),
    (["--tasks", TASK, "--task-dir", "/nonexistent/tasks"], "--task-dir /nonexistent/tasks is not a folder"),
    (["--suite", "fewshot"], "--suite must be one of generative, zero-shot"),
]  # fmt: skip


@pytest.mark.parametrize("argv,fragment", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line_and_writes_nothing(argv, fragment, cli, rows_file, tmp_path, monkeypatch):
    from nexus_retrofit.evaluation.zero_shot import vllm_available

    if "vllm is not installed" in fragment and vllm_available():
        pytest.skip("vllm is installed here")
    _offline(monkeypatch)
    if callable(argv):
        argv = argv(tmp_path, rows_file)
        fragment = fragment.replace("gone.jsonl", str(tmp_path / "gone.jsonl"))
    result = cli("eval", tiny_model_path(), *argv, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    from nexus_retrofit.evaluation.zero_shot import lm_eval_version

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as where it is not installed
    with pytest.raises(ValueError, match=r"not installed: pip install 'nexus-retrofit\[zero-shot\]'"):
        lm_eval_version()


def test_a_missing_model_is_refused_after_the_tasks_load_and_before_any_write(cli, tmp_path):
    result = cli("eval", tmp_path / "no-model", "--tasks", TASK, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_the_paper_suite_offline_names_each_dataset_and_the_task_dir_fix(cli, tmp_path, monkeypatch):
    """--suite zero-shot resolves lm-eval's own six task names; without their data (offline, empty
    caches) one line names every task's dataset and says how to use local files."""
    import datasets
    import huggingface_hub.constants as constants

    _offline(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    result = cli("eval", tiny_model_path(), "--suite", "zero-shot", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    for name in PAPER_TASKS:
        assert f"task {name} cannot load the dataset " in line, name
    assert "allenai/ai2_arc (ARC-Challenge)" in line and "--task-dir DIR" in line
    assert not (tmp_path / "out").exists()
