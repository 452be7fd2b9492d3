"""Load a task's rows from the Hub (revision pinned and recorded) or from a local jsonl/parquet file.

Every load returns where the rows came from (`source`): Hub id, config, split and the resolved
commit sha, or the local path and its sha256, so results.json says exactly which data was scored.
Columns are checked before anything runs: a wrong or missing column is named together with the
columns the task expects and the ones the file has.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .tasks import Task

LOCAL_SUFFIXES = (".jsonl", ".parquet")


class DataError(ValueError):
    """The data for a task cannot be used; the message names the file, the column and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_data_file(task: Task, data_dir: str | Path | None) -> Path | None:
    """The local file for `task`: `DATA_DIR/<name>.jsonl|.parquet`, or `task.dataset` if it is a file."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"--data-dir {data_dir} is not a folder")
        found = [
            data_dir / f"{task.name}{suffix}"
            for suffix in LOCAL_SUFFIXES
            if (data_dir / f"{task.name}{suffix}").is_file()
        ]
        if len(found) > 1:
            raise DataError(f"both {found[0]} and {found[1]} exist for task {task.name}; keep one")
        if not found:
            raise DataError(
                f"no data for task {task.name} in {data_dir}: expected {task.name}.jsonl or {task.name}.parquet "
                f"with columns {task.required_columns()}"
            )
        return found[0]
    path = Path(task.dataset)
    if path.suffix in LOCAL_SUFFIXES or path.is_file():
        if not path.is_file():
            raise DataError(f"task {task.name}: data file {path} does not exist")
        return path
    return None


def read_local_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: local data must be .jsonl or .parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_columns(task: Task, columns: Iterable[str], where: str) -> None:
    """Raise DataError naming each required column of `task` that `columns` lacks."""
    have = list(columns)
    missing = [c for c in task.required_columns() if c not in have]
    if not missing:
        return
    hints = []
    for column in missing:
        close = difflib.get_close_matches(column, have, n=1, cutoff=0.6)
        hints.append(f"{column!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    optional = task.optional_columns()
    raise DataError(
        f"{where} is missing column {', '.join(hints)} for task {task.name}. Expected the columns "
        f"{task.required_columns()}" + (f" (optional {optional})" if optional else "") + f"; found {have}. "
        "Rename the column(s) in the file, or define a task whose `columns` map to yours."
    )


def _check_rows(task: Task, rows: list[dict[str, Any]], where: str) -> None:
    if not rows:
        raise DataError(f"{where} has no rows")
    check_columns(task, rows[0].keys(), where)
    required = task.required_columns()
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise DataError(
                f"{where} row {i} is missing column {missing[0]!r} (required for task {task.name})"
            )
        empty = [c for c in required if row[c] is None]
        if empty and not (empty == [task.columns.get("answer")] and task.columns.get("solution") in row):
            raise DataError(f"{where} row {i} has an empty {empty[0]!r} (required for task {task.name})")
        conflict = task.choice_conflict(row)
        if conflict is not None:
            pid = task.columns.get("id")
            named = f" (id {row[pid]!r})" if pid and row.get(pid) is not None else ""
            raise DataError(
                f"{where} row {i}{named}: {conflict}; a multiple-choice row of task {task.name} needs "
                "distinct, non-empty choices: fix the row or remove it from the data"
            )


def _resolve_hub_revision(task: Task) -> str | None:
    """The commit sha of the dataset at task.revision (None when the Hub cannot be asked)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(task.dataset, revision=task.revision).sha
    except Exception:  # offline with a local cache: load anyway, record the requested revision
        return None


def load_task_rows(
    task: Task, data_dir: str | Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of `task` (validated) and a description of their source for results.json."""
    path = local_data_file(task, data_dir)
    if path is not None:
        rows = read_local_rows(path)
        _check_rows(task, rows, str(path))
        return rows, {
            "kind": "local",
            "path": str(path.resolve()),
            "sha256": sha256_file(path),
            "rows": len(rows),
        }

    from datasets import load_dataset

    sha = _resolve_hub_revision(task)
    try:
        dataset = load_dataset(task.dataset, task.config, split=task.split, revision=sha or task.revision)
    except Exception as e:
        gated = (
            " (a gated dataset: accept its terms on the Hub and `hf auth login`)"
            if task.name.startswith("gpqa")
            else ""
        )
        raise DataError(
            f"could not load {task.dataset} (config {task.config}, split {task.split}) for task {task.name}{gated}: "
            f"{type(e).__name__}: {e}. Offline? Put {task.name}.jsonl in a folder and pass --data-dir."
        ) from e
    check_columns(task, dataset.column_names, f"{task.dataset} ({task.split})")
    rows = dataset.to_list()
    _check_rows(task, rows, f"{task.dataset} ({task.split})")
    source = {
        "kind": "hub",
        "dataset": task.dataset,
        "config": task.config,
        "split": task.split,
        "revision": sha or task.revision,
        "revision_resolved": sha is not None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "rows": len(rows),
    }
    return rows, source
