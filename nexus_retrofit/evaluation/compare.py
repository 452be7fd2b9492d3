"""Compare results.json files: a markdown table with deltas (the paper's Table 3 layout) and a bar chart.

Rows are models, columns are benchmarks, cells are pass@1 (generative tasks) or lm-eval's acc
(zero-shot tasks) in percent ± its standard error; every row after the first also shows its
difference from the first (the baseline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_TITLES = {
    "math_500": "MATH-500", "aime24": "AIME24", "gpqa_diamond": "GPQA-Diamond",
    "arc_challenge": "ARC-C", "arc_easy": "ARC-E", "hellaswag": "HellaSwag", "logiqa": "LogiQA",
    "piqa": "PIQA", "sciq": "SciQ",
}  # fmt: skip
# A task's headline score and its standard error: pass@1 (generative) or acc (lm-eval zero-shot).
HEADLINES = (("pass@1", "stderr"), ("acc", "acc_stderr"))


def headline(task: dict[str, Any]) -> tuple[str, float, float] | None:
    """(metric, value, standard error) a task is reported by, or None for an unscored entry."""
    for key, stderr in HEADLINES:
        if key in task:
            return key, task[key], task.get(stderr) or 0.0
    return None


# Settings that change the numbers but not the model: runs that differ in them are not comparable.
# (model, revision, tasks, data_dir, parallelism and batch size do not enter; the per-task fingerprint
# covers the data, the sample count, the problem count and the grader.)
COMPARED_SETTINGS = (
    "temperature", "top_p", "max_new_tokens", "seed", "limit", "num_samples", "system_prompt",
    "use_chat_template", "backend", "dtype", "max_model_len",
)  # fmt: skip


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json (or its folder); malformed files are one-line errors naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path} is not a results.json written by `nexus-retrofit eval`")
    for name, task in data["tasks"].items():
        for key, stderr in HEADLINES:
            if key in task and not all(isinstance(task.get(k), (int, float)) for k in (key, stderr)):
                raise ValueError(f"{path}: task {name} has a non-numeric {key} or {stderr}")
    if not data.get("complete", True):
        data.setdefault("_notes", []).append("incomplete run")
    return data


def settings_mismatches(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[str]:
    """'key: label=value, label=value' for every setting or task fingerprint the runs disagree on."""
    problems = []
    for key in COMPARED_SETTINGS:
        values = [(label, (run.get("settings") or {}).get(key, "?")) for run, label in zip(runs, labels)]
        known = [v for _, v in values if v != "?"]
        if len({json.dumps(v, sort_keys=True) for v in known}) > 1:
            problems.append(f"{key}: " + ", ".join(f"{label}={value!r}" for label, value in values))
    tasks = {t for run in runs for t in _scored(run)}
    for task in sorted(tasks):
        prints = [(label, run["tasks"].get(task, {}).get("fingerprint")) for run, label in zip(runs, labels)]
        known = [(label, f) for label, f in prints if f]
        for field in ("data", "num_samples", "n_problems", "grader", "task"):
            seen = {json.dumps(f.get(field), sort_keys=True) for _, f in known}
            if len(seen) > 1:
                shown = ", ".join(f"{label}={_short(f.get(field))}" for label, f in known)
                problems.append(f"{task}.{field}: {shown}")
    return problems


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return repr(text[:12]) if isinstance(value, str) and len(text) > 20 else text[:60]


def default_label(results: dict[str, Any], path: str | Path) -> str:
    model = str(results.get("model", {}).get("path") or path)
    return Path(model.rstrip("/")).name or model


def _scored(results: dict[str, Any]) -> dict[str, dict]:
    return {name: t for name, t in results["tasks"].items() if isinstance(t, dict) and headline(t)}


def compare_table(
    runs: Sequence[dict[str, Any]], labels: Sequence[str], mismatches: Sequence[str] = ()
) -> str:
    """Markdown table: one row per run, one column per task (first-seen order), plus the average.

    `mismatches` (settings the runs disagree on, when the caller chose to show them anyway) are printed
    above the table, so that a pasted table carries its warning."""
    if not runs:
        raise ValueError("nothing to compare")
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in _scored(run) if t not in tasks]
    show_avg = len(tasks) > 1
    header = ["Model", *(TASK_TITLES.get(t, t) for t in tasks)] + (["Average"] if show_avg else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    base = _scored(runs[0])
    base_avg = _average(base, tasks)
    for k, (run, label) in enumerate(zip(runs, labels)):
        scored = _scored(run)
        cells = [label]
        for t in tasks:
            if t not in scored:
                cells.append("–")
                continue
            _, value, se = headline(scored[t])
            value, se = 100 * value, 100 * se
            cell = f"{value:.1f} ± {se:.1f}"
            if k > 0 and t in base:
                cell += f" ({value - 100 * headline(base[t])[1]:+.1f})"
            cells.append(cell)
        if show_avg:
            avg = _average(scored, tasks)
            cell = "–" if avg is None else f"{avg:.1f}"
            if k > 0 and avg is not None and base_avg is not None:
                cell += f" ({avg - base_avg:+.1f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{label}: {', '.join(run['_notes'])}" for run, label in zip(runs, labels) if run.get("_notes")]
    metrics = sorted({headline(t)[0] for run in runs for t in _scored(run).values()}, reverse=True)
    footer = (
        f"\n\n{' / '.join(metrics)} (%) ± standard error over problems; (±x) = difference from {labels[0]}."
    )
    if notes:
        footer += " Note: " + "; ".join(notes) + "."
    warning = (
        f"**WARNING: these runs used different settings; the deltas are not comparable** "
        f"({'; '.join(mismatches)})\n\n"
        if mismatches
        else ""
    )
    return warning + "\n".join(lines) + footer


def _average(scored: dict[str, dict], tasks: Sequence[str]) -> float | None:
    if not all(t in scored for t in tasks):
        return None
    return 100 * sum(headline(scored[t])[1] for t in tasks) / len(tasks)


def plot_comparison(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: str | Path) -> Path:
    """Grouped bar chart (task groups, one bar per run, standard-error whiskers) written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in _scored(run) if t not in tasks]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) * max(1, len(runs)) / 2), 3.6))
    for k, (run, label) in enumerate(zip(runs, labels)):
        scored = _scored(run)
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
        values = [100 * headline(scored[t])[1] if t in scored else 0.0 for t in tasks]
        errors = [100 * headline(scored[t])[2] if t in scored else 0.0 for t in tasks]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(tasks)), [TASK_TITLES.get(t, t) for t in tasks])
    ax.set_ylabel(
        " / ".join(sorted({headline(t)[0] for run in runs for t in _scored(run).values()}, reverse=True))
        + " (%)"
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    from ..safe_output import check_output_path, save_figure

    return save_figure(fig, check_output_path(path, "--plot"), dpi=150)
