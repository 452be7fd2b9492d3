"""Run tasks on a model, grade, and write results.json + samples_<task>.jsonl; resume interrupted runs.

Reproducibility rules (docs/DESIGN.md §8):
- every setting, package version, dataset revision (or local file sha256) and the model config go
  into results.json, which is written atomically (temp file, then os.replace) after every task;
- problems are cut into fixed batches by position (`batch_size` problems each) and every problem has
  its own seed (seed, task, problem index): the same batch always holds the same problems with the
  same seeds, so a resumed run regenerates exactly what an uninterrupted one would have;
- the samples of a problem are appended (and fsynced) as soon as its batch is graded; a resume skips
  finished problems, and only continues a run whose settings match; a different configuration is
  never overwritten without `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..safe_output import (
    atomic_write_text,
    check_no_collisions,
    check_output_location,
    claim,
    is_marked,
    notify_left,
    output_lock,
    remove_owned,
)
from . import resume
from .backends import Backend, Sampling, default_backend, make_backend, render_prompt
from .data import load_task_rows
from .grading import get_grader
from .provenance import model_info, package_versions
from .resume import RESULTS_FORMAT
from .samples import append_samples, read_samples, samples_path
from .tasks import Problem, Task, get_task, stable_int

if TYPE_CHECKING:
    from rich.progress import Progress

DEFAULT_TASKS = ("math_500", "aime24", "gpqa_diamond")
DEFAULT_HF_BATCH = 8
# Settings that do not change what is generated or how it is graded: a resume may differ in them.
NOT_OUTCOME_SETTINGS = frozenset(
    {"tasks", "data_dir", "trust_remote_code", "data_parallel_size", "gpu_memory_utilization"}
)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers (all of it is written to results.json)."""

    model: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    backend: str | None = None  # None: vllm when installed, else hf
    num_samples: int | None = None  # None: each task's own default (docs/DESIGN.md §8)
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 1234
    limit: int | None = None  # first N problems of each task
    batch_size: int | None = None  # problems per generate call; None: hf 8, vllm all
    system_prompt: str | None = None
    data_dir: str | None = None
    dtype: str = "auto"
    use_chat_template: bool = True
    trust_remote_code: bool = False
    revision: str | None = None  # model revision on the Hub
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks.split(",") if t.strip()))
        if not self.tasks:
            raise ValueError("no tasks given; e.g. --tasks math_500,aime24,gpqa_diamond")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task is listed twice in {list(self.tasks)}")
        for name, value in (
            ("limit", self.limit),
            ("batch_size", self.batch_size),
            ("num_samples", self.num_samples),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        Sampling(1, self.temperature, self.top_p, self.max_new_tokens)  # validates the ranges

    def resolved(self) -> EvalSettings:
        backend = self.backend or default_backend()
        batch = (
            self.batch_size
            if self.batch_size is not None
            else (DEFAULT_HF_BATCH if backend == "hf" else None)
        )
        return dataclasses.replace(self, backend=backend, batch_size=batch)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d


# ------------------------------------------------------------------------------------------ files
def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) never sees a half-written file."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ---------------------------------------------------------------------------------------- metrics
def task_metrics(per_problem: dict[int, list[dict]]) -> dict[str, Any]:
    """pass@1 (mean over problems of the fraction of correct samples), its standard error over
    problems, and the extraction-failure count and rate."""
    scores = [sum(bool(r["correct"]) for r in group) / len(group) for group in per_problem.values()]
    records = [r for group in per_problem.values() for r in group]
    n = len(scores)
    mean = sum(scores) / n if n else float("nan")
    stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else 0.0
    failures = sum(r["extracted"] is None for r in records)
    tokens = sum(int(r.get("num_tokens", 0)) for r in records)
    return {
        "pass@1": mean,
        "stderr": stderr,
        "n_problems": n,
        "n_samples": len(records) // n if n else 0,
        "n_correct": sum(bool(r["correct"]) for r in records),
        "extraction_failures": failures,
        "extraction_failure_rate": failures / len(records) if records else 0.0,
        "mean_completion_tokens": tokens / len(records) if records else 0.0,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class _TaskPlan:
    task: Task
    problems: list[Problem]
    source: dict[str, Any]
    num_samples: int
    fingerprint: dict[str, Any]


def _plan(settings: EvalSettings) -> list[_TaskPlan]:
    """Load and validate every task's data before any model is loaded (fail fast)."""
    plans = []
    for name in settings.tasks:
        task = get_task(name)
        rows, source = load_task_rows(task, settings.data_dir)
        rows = rows[: settings.limit] if settings.limit else rows
        problems = [task.problem(row, i, settings.seed) for i, row in enumerate(rows)]
        n = settings.num_samples or task.num_samples
        data_id = source.get("sha256") or source.get("revision")
        fingerprint = {
            "task": task.to_dict(),
            "data": data_id,
            "num_samples": n,
            "n_problems": len(problems),
            "grader": get_grader(task.grader).describe(),
        }
        if task.is_multiple_choice and task.num_choices != 4 and "ABCD" in task.prompt:
            raise ValueError(f"task {name}: the prompt says ABCD but the task has {task.num_choices} choices")
        plans.append(_TaskPlan(task, problems, source, n, fingerprint))
    return plans


def check_previous(
    output_dir: Path, settings: dict, plans: list[_TaskPlan], model: dict, overwrite: bool
) -> dict | None:
    """The previous results to continue, None for a fresh run; raise on a configuration or model
    mismatch (resume.check_previous) or a malformed samples file. Reads only."""
    previous = resume.check_previous(
        output_dir,
        settings,
        {plan.task.name: plan.fingerprint for plan in plans},
        [samples_path(output_dir, plan.task.name) for plan in plans],
        model,
        overwrite,
        NOT_OUTCOME_SETTINGS,
    )
    if previous is not None:  # a malformed samples file is reported now, before any model is loaded
        for plan in plans:
            read_samples(samples_path(output_dir, plan.task.name), plan.num_samples, repair=False)
    return previous


def _needs_generation(output_dir: Path, plans: list[_TaskPlan], previous: dict | None) -> bool:
    if previous is None:
        return any(plan.problems for plan in plans)
    for plan in plans:
        done = read_samples(samples_path(output_dir, plan.task.name), plan.num_samples, repair=False)
        if any(p.index not in done for p in plan.problems):
            return True
    return False


def _writes(plans: list[_TaskPlan]) -> Callable[[str], bool]:
    """The names a run of these tasks writes in its output folder."""
    names = {"results.json", *(samples_path(Path(), p.task.name).name for p in plans)}
    return names.__contains__


def _adopt_legacy(output_dir: Path) -> None:
    """A folder written before manifests existed: its results.json (this runner's format) and the
    samples files it names are this tool's."""
    results_file = output_dir / "results.json"
    if is_marked(output_dir) or not results_file.is_file():
        return
    try:
        previous = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or previous.get("format") != RESULTS_FORMAT:
        return
    tasks = previous.get("tasks") if isinstance(previous.get("tasks"), dict) else {}
    names = [
        str(t.get("samples_file")) for t in tasks.values() if isinstance(t, dict) and t.get("samples_file")
    ]
    claim(output_dir, ["results.json", *[n for n in names if "/" not in n]], "eval", mutable=True)


# -------------------------------------------------------------------------------------------- run
def _progress(enabled: bool) -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("problems"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[speed]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _run_task(
    plan: _TaskPlan,
    settings: EvalSettings,
    output_dir: Path,
    get_backend: Callable[[], Backend],
    progress: Progress,
) -> tuple[dict[int, list[dict]], int, float]:
    """Generate and grade the unfinished problems of one task: (samples per problem, tokens
    generated by this call, seconds spent generating them)."""
    task, n = plan.task, plan.num_samples
    path = samples_path(output_dir, task.name)
    done = read_samples(path, n)
    grader = get_grader(task.grader)
    sampling = Sampling(n, settings.temperature, settings.top_p, settings.max_new_tokens)
    size = settings.batch_size or max(len(plan.problems), 1)
    batches = [plan.problems[i : i + size] for i in range(0, len(plan.problems), size)]
    bar = progress.add_task(task.name, total=len(plan.problems), completed=len(done), speed="")
    tokens, started, generating = 0, time.perf_counter(), 0.0
    for batch in batches:
        if all(p.index in done for p in batch):
            continue
        backend = get_backend()
        # The whole batch is regenerated even if part of it was written: same batch, same samples.
        prompts = [
            render_prompt(backend.tokenizer, p.prompt, settings.system_prompt, settings.use_chat_template)
            for p in batch
        ]
        seeds = [stable_int("sample", settings.seed, task.name, p.index) for p in batch]
        generate_start = time.perf_counter()
        generations = backend.generate(prompts, sampling, seeds)
        generating += time.perf_counter() - generate_start
        for problem, prompt, generation in zip(batch, prompts, generations):
            if problem.index in done:
                continue
            records = []
            for j, (completion, count) in enumerate(zip(generation.completions, generation.num_tokens)):
                verdict = grader.grade(completion, problem.gold, task.num_choices or 4)
                records.append(
                    {
                        "task": task.name,
                        "problem_index": problem.index,
                        "problem_id": problem.id,
                        "sample_index": j,
                        "prompt": prompt,
                        "completion": completion,
                        "extracted": verdict.extracted,
                        "gold": problem.gold,
                        "correct": verdict.correct,
                        "num_tokens": count,
                    }
                )
            append_samples(path, records)
            done[problem.index] = records
            tokens += sum(generation.num_tokens)
            progress.advance(bar)
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        progress.update(bar, speed=f"{speed:,.0f} tok/s")
    return done, tokens, generating


def evaluate(
    settings: EvalSettings,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    backend: Backend | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `settings.model` on `settings.tasks`; write and return results.json's content.

    `backend` may be given ready-made (tests, notebooks); otherwise it is built on first need, so a
    run whose samples are all written again only re-scores them.
    """
    settings = settings.resolved()
    output_dir = Path(output_dir)
    check_output_location(output_dir, "--output-dir", may_be_protected=True)  # it replaces only its own files
    with output_lock(output_dir, "eval", "--output-dir"):  # one writer per folder
        return _evaluate(settings, output_dir, overwrite, backend, show_progress)


def _evaluate(
    settings: EvalSettings,
    output_dir: Path,
    overwrite: bool,
    backend: Backend | None,
    show_progress: bool,
) -> dict[str, Any]:
    plans = _plan(settings)  # data and columns are checked before anything is created
    for plan in plans:
        if plan.num_samples > 1 and settings.temperature == 0:
            raise ValueError(
                f"{plan.task.name}: {plan.num_samples} samples per problem with --temperature 0: greedy "
                "decoding gives identical samples, not independent ones; pass --temperature > 0 (e.g. 0.6) "
                "or --num-samples 1"
            )
    if output_dir.is_dir():
        _adopt_legacy(output_dir)
        check_no_collisions(output_dir, _writes(plans), "--output-dir")  # never replace another's file
    model = model_info(settings.model, settings.revision, settings.trust_remote_code)
    settings_dict = settings.to_dict()
    previous = check_previous(output_dir, settings_dict, plans, model, overwrite)

    holder: dict[str, Backend] = {}

    def get_backend() -> Backend:
        if backend is not None:
            return backend
        if "b" not in holder:
            holder["b"] = make_backend(
                settings.backend,
                settings.model,
                dtype=settings.dtype,
                trust_remote_code=settings.trust_remote_code,
                revision=model["load_revision"],
                seed=settings.seed,
                tensor_parallel_size=settings.tensor_parallel_size,
                data_parallel_size=settings.data_parallel_size,
                max_model_len=settings.max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization,
            )
        return holder["b"]

    # The model is loaded before the first write: a bad model path or flag leaves nothing behind that
    # a corrected re-run would have to fight ("different settings"). A finished run is only re-scored.
    if _needs_generation(output_dir, plans, previous):
        get_backend()
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # what this runner wrote here before, and nothing else (the manifest)
        notify_left(output_dir, remove_owned(output_dir))

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "complete": False,
        "started_at": (previous or {}).get("started_at", _now()),
        "updated_at": _now(),
        "model": model,
        "settings": settings_dict,
        "versions": package_versions(),
        "tasks": dict((previous or {}).get("tasks", {})),
    }
    for plan in plans:
        results["tasks"][plan.task.name] = {
            "complete": False,
            "samples_file": samples_path(output_dir, plan.task.name).name,
            "fingerprint": plan.fingerprint,
            "dataset": plan.source,
        }
    results_file = output_dir / "results.json"
    mine = ["results.json", *(samples_path(output_dir, p.task.name).name for p in plans)]
    claim(output_dir, [], "eval")  # marked before the first write ...
    write_json_atomic(results_file, results)
    for name in mine[1:]:
        (output_dir / name).touch()
    claim(output_dir, mine, "eval", mutable=True)  # ... and its files are the runner's as soon as they exist

    try:
        with _progress(show_progress) as progress:
            for plan in plans:
                per_problem, tokens, seconds = _run_task(plan, settings, output_dir, get_backend, progress)
                entry = results["tasks"][plan.task.name]
                entry.update(task_metrics({p.index: per_problem[p.index] for p in plan.problems}))
                if tokens:  # throughput of what this invocation generated (a resume counts only its part)
                    entry["throughput"] = {
                        "generated_tokens": tokens,
                        "generation_seconds": seconds,
                        "tokens_per_second": tokens / max(seconds, 1e-9),
                    }
                entry["complete"] = True
                results["updated_at"] = _now()
                write_json_atomic(results_file, results)
    finally:
        if "b" in holder:
            holder["b"].close()
    results["complete"] = True
    results["updated_at"] = _now()
    write_json_atomic(results_file, results)
    claim(output_dir, mine, "eval", complete=True, mutable=True)
    return results


def grade_samples(task_name: str, records: Sequence[dict]) -> tuple[float, list[bool], list[str | None]]:
    """Re-grade saved completions with the current grader: (accuracy, verdicts, extracted answers)."""
    task = get_task(task_name)
    grader = get_grader(task.grader)
    verdicts = []
    for i, record in enumerate(records):
        missing = [k for k in ("completion", "gold") if k not in record]
        if missing:
            raise ValueError(
                f"line {i + 1} has no {missing[0]!r} field (each line needs 'completion' and 'gold')"
            )
        verdicts.append(grader.grade(str(record["completion"]), str(record["gold"]), task.num_choices or 4))
    correct = [v.correct for v in verdicts]
    return (sum(correct) / len(correct) if correct else 0.0), correct, [v.extracted for v in verdicts]
