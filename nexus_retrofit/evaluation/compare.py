"""Compare results.json files: a markdown table with deltas (the paper's Table 3 layout) and a bar chart.

Rows are models, columns are benchmarks, cells are pass@1 in percent ± its standard error; every row
after the first also shows its difference from the first (the baseline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_TITLES = {"math_500": "MATH-500", "aime24": "AIME24", "gpqa_diamond": "GPQA-Diamond"}


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    data = json.loads(path.read_text())
    if "tasks" not in data:
        raise ValueError(f"{path} is not a results.json written by `nexus-retrofit eval`")
    if not data.get("complete", True):
        data.setdefault("_notes", []).append("incomplete run")
    return data


def default_label(results: dict[str, Any], path: str | Path) -> str:
    model = str(results.get("model", {}).get("path") or path)
    return Path(model.rstrip("/")).name or model


def _scored(results: dict[str, Any]) -> dict[str, dict]:
    return {name: t for name, t in results["tasks"].items() if "pass@1" in t}


def compare_table(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Markdown table: one row per run, one column per task (first-seen order), plus the average."""
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
            value, se = 100 * scored[t]["pass@1"], 100 * scored[t]["stderr"]
            cell = f"{value:.1f} ± {se:.1f}"
            if k > 0 and t in base:
                cell += f" ({value - 100 * base[t]['pass@1']:+.1f})"
            cells.append(cell)
        if show_avg:
            avg = _average(scored, tasks)
            cell = "–" if avg is None else f"{avg:.1f}"
            if k > 0 and avg is not None and base_avg is not None:
                cell += f" ({avg - base_avg:+.1f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{label}: {', '.join(run['_notes'])}" for run, label in zip(runs, labels) if run.get("_notes")]
    footer = f"\n\npass@1 (%) ± standard error over problems; (±x) = difference from {labels[0]}."
    if notes:
        footer += " Note: " + "; ".join(notes) + "."
    return "\n".join(lines) + footer


def _average(scored: dict[str, dict], tasks: Sequence[str]) -> float | None:
    if not all(t in scored for t in tasks):
        return None
    return 100 * sum(scored[t]["pass@1"] for t in tasks) / len(tasks)


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
        values = [100 * scored[t]["pass@1"] if t in scored else 0.0 for t in tasks]
        errors = [100 * scored[t]["stderr"] if t in scored else 0.0 for t in tasks]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(tasks)), [TASK_TITLES.get(t, t) for t in tasks])
    ax.set_ylabel("pass@1 (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
