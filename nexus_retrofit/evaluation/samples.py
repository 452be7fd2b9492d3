"""The samples store of `eval`: samples_<task>.jsonl, one line per sample, appended as problems finish.

A resumed run reads back the finished problems (`read_samples`); a line torn by a killed write is
dropped, any other malformed line is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ResumeError(ValueError):
    """The output folder holds a run of a different configuration."""


def samples_path(output_dir: Path, task_name: str) -> Path:
    return output_dir / f"samples_{task_name}.jsonl"


SAMPLE_KEYS = ("problem_index", "sample_index", "correct", "extracted")


def _sample_problem(record: Any) -> str | None:
    """Why a samples line cannot be one of this runner's records, or None."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    missing = [k for k in SAMPLE_KEYS if k not in record]
    if missing:
        return f"has no {missing[0]!r} field"
    for key in ("problem_index", "sample_index"):
        if isinstance(record[key], bool) or not isinstance(record[key], int) or record[key] < 0:
            return f"has {key} {record[key]!r}, not an index"
    return None


def read_samples(path: Path, num_samples: int, repair: bool = True) -> dict[int, list[dict]]:
    """Finished problems of a samples file: problem_index -> its `num_samples` lines.

    A torn last line (the run was killed mid-write) and problems with fewer lines than samples are
    dropped from the file (with `repair`; without it the file is only read), so that the resume
    regenerates them. Any other malformed line is an error naming the file and the line.
    """
    if not path.exists():
        return {}
    lines = path.read_bytes().splitlines(keepends=True)  # bytes: a write torn inside a character
    records = []
    fix = "fix or delete the file (or --overwrite)"
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines) and not line.endswith(b"\n"):  # torn final write
                break
            what = "is not UTF-8" if isinstance(e, UnicodeDecodeError) else f"is not valid JSON ({e.msg})"
            raise ResumeError(f"{path} line {number} {what}; {fix}") from None
        why = _sample_problem(record)
        if why is not None:
            raise ResumeError(f"{path} line {number} {why}; {fix}")
        records.append(record)
    by_problem: dict[int, list[dict]] = {}
    for record in records:
        by_problem.setdefault(int(record["problem_index"]), []).append(record)
    finished = {}
    for index, group in by_problem.items():
        if sorted(r["sample_index"] for r in group) == list(range(num_samples)):
            finished[index] = sorted(group, key=lambda r: r["sample_index"])
        elif len(group) > num_samples:
            raise ResumeError(f"{path}: problem {index} has {len(group)} samples, expected {num_samples}")
    kept = [r for r in records if int(r["problem_index"]) in finished]
    if repair and len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    return finished


def append_samples(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
