"""Whether an evaluation folder's earlier run may be continued: the one rule `eval` (runner.py) and
`eval --suite zero-shot` (zero_shot.py) apply.

A run resumes only what it would have written itself: same settings (but those that do not change a
score), same task fingerprints (data, prompts, grader), same model fingerprint. Anything else is a
one-line ResumeError naming the difference and the fix (--overwrite, or another --output-dir), raised
before any model loads. Reads only: nothing is written or removed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .samples import ResumeError

RESULTS_FORMAT = "nexus-retrofit-eval/1"


def differences(old: dict, new: dict, ignore: frozenset = frozenset()) -> list[str]:
    """`key: old -> new` for each key whose value differs, but the ignored ones."""
    keys = sorted((set(old) | set(new)) - ignore)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_results(path: Path) -> dict[str, Any]:
    """A results.json as a mapping; a malformed file is a one-line error naming it and the line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResumeError(
            f"{path} line {e.lineno} is not valid JSON ({e.msg}); fix or delete it (or --overwrite)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResumeError(f"{path} cannot be read ({e}); fix or delete it (or --overwrite)") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
        raise ResumeError(
            f"{path} line 1 is not a nexus-retrofit results object; fix or delete it (or --overwrite)"
        )
    return data


def model_changed(previous: dict, model: dict) -> str | None:
    """Why the model behind `previous` cannot be taken for `model` (stale scores), or None."""
    old = (previous.get("model") or {}).get("fingerprint")
    new = model["fingerprint"]
    if old is None:
        return "it was written without a model fingerprint, so it may be of another model"
    if old != new:

        def short(f: dict) -> str:
            return str(f.get("sha256") or f.get("commit") or f)[:16]

        return f"the model at {model['path']} changed since (fingerprint {short(old)} -> {short(new)})"
    return None


def check_previous(
    output_dir: Path,
    settings: dict,
    fingerprints: Mapping[str, dict],
    samples_files: Sequence[Path],
    model: dict,
    overwrite: bool,
    not_outcome: frozenset,
) -> dict | None:
    """The previous results.json to continue, or None for a fresh run (none there, or `overwrite`).

    fingerprints: task name -> what decides that task's scores; samples_files: the files this run
    writes per task (present without a results.json, their settings are unknown: refused);
    not_outcome: the settings a resume may change."""
    results_file = output_dir / "results.json"
    if overwrite:
        return None
    if not results_file.exists():
        stray = [f.name for f in samples_files if f.exists()]
        if stray:
            raise ResumeError(
                f"{output_dir} has {', '.join(stray)} but no results.json, so their settings are unknown; pass "
                "--overwrite to start again, or choose another --output-dir"
            )
        return None
    previous = read_results(results_file)
    if previous.get("format") != RESULTS_FORMAT:
        raise ResumeError(f"{results_file} is not a nexus-retrofit results file; choose another --output-dir")
    diff = differences(previous.get("settings", {}), settings, not_outcome)
    for name, fingerprint in fingerprints.items():
        old = previous.get("tasks", {}).get(name)
        if old is not None:
            diff += [f"{name}.{d}" for d in differences(old.get("fingerprint", {}), fingerprint)]
    if diff:
        raise ResumeError(
            f"{output_dir} holds a run with different settings ({'; '.join(diff)}); resuming it would mix "
            "configurations. Pass --overwrite to replace it, or choose another --output-dir"
        )
    changed = model_changed(previous, model)
    if changed:
        raise ResumeError(
            f"refusing to resume {results_file}: {changed}; its scores would be stale. Pass --overwrite to "
            "start over, or choose another --output-dir"
        )
    return previous
