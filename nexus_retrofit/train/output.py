"""The run folder of `nexus-retrofit train`: what a run may do to output_dir, resume, the run record.

Decided before any data or model is loaded (`plan_output_dir`), applied once everything has loaded
(`begin_output`) and completed after the final save (`finish_output`). Ownership, locking and the
atomic writes are nexus_retrofit.safe_output's; this module knows what a training run writes there:
the recipe copy, `nexus_train_run.json` (whether the final model belongs to the recipe beside it),
checkpoint-N folders and the final model.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_output import (
    OutputError,
    atomic_write_text,
    check_no_collisions,
    check_output_location,
    claim,
    is_marked,
    notify_left,
    owned_and_foreign,
    remove_owned,
)
from .errors import RecipeError
from .recipe import CONFIG_FILE, Recipe

_log = logging.getLogger(__name__)

RUN_RECORD = "nexus_train_run.json"  # {"complete": bool, "files": [the final files this run wrote]}
RECORD_FORMAT = "nexus-retrofit-train/1"
IDENTITY_KEYS = ("model_name_or_path", "model_revision", "dataset_name", "dataset_config", "dataset_mixture")
IDENTITY_KEYS += ("use_peft",)  # a LoRA checkpoint holds adapters, not the weights a full run resumes


# --- output folder -------------------------------------------------------------------------------


def _resume_target(value: str | bool | None) -> str | bool | None:
    if value is None or value is False:
        return None
    if value is True or str(value).lower() in ("true", "yes", "1", "last"):
        return True
    if str(value).lower() in ("false", "no", "0", "none", ""):
        return None
    return str(value)


def _identity(recipe: Recipe) -> dict[str, Any]:
    values = {k: recipe.values.get(k) for k in IDENTITY_KEYS}
    values["use_peft"] = bool(values["use_peft"])  # unset and false are the same run
    values["nexus"] = None if recipe.nexus is None else recipe.nexus.architecture()
    return values


def _previous_identity(folder: Path) -> dict[str, Any] | None:
    import yaml

    from ..yaml_loading import load_yaml

    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        previous = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    if not isinstance(previous, dict):
        return None
    values = {k: previous.get(k) for k in IDENTITY_KEYS}
    values["use_peft"] = bool(values["use_peft"])
    values["nexus"] = previous.get("nexus")
    return values


def _identity_diff(current: dict[str, Any], previous: dict[str, Any]) -> list[str]:
    diff = [f"{k}: {previous[k]!r} -> {current[k]!r}" for k in IDENTITY_KEYS if current[k] != previous[k]]
    now, before = current["nexus"], previous["nexus"]
    if (now is None) != (before is None):
        diff.append(
            f"nexus block: {'present' if before is not None else 'absent'} -> {'present' if now is not None else 'absent'}"
        )
    elif now is not None:
        diff += [
            f"nexus.{k}: {before.get(k)!r} -> {v!r}"
            for k, v in now.items()
            if _norm(before.get(k)) != _norm(v)
        ]
    return diff


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and set(value) <= set("qkv,")):
        return "".join(sorted(c for c in "".join(value) if c in "qkv"))
    return value


# Files a run writes beside its checkpoints. A folder this tool wrote before the run record existed
# (it has the recipe file but no record) has its old final model recognised by these names.
LEGACY_FINAL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "modeling_nexus.py", "configuration_nexus.py", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
    "tokenizer.model", "train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
    "training_args.bin", "README.md",
)  # fmt: skip


# Names a run (the Trainer, save_model, the tokenizer, this module) writes at the top of output_dir: a
# foreign entry matching one is refused before any work, since the run would replace it.
TRAIN_WRITES = (
    *LEGACY_FINAL_FILES,
    CONFIG_FILE,
    RUN_RECORD,
    "checkpoint-*",
    "runs",
    "*.safetensors",
    "*.bin",
)


def _train_writes(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TRAIN_WRITES)


def _adopt_legacy(out: Path) -> None:
    """A run folder written before markers existed (it has this tool's recipe file): its recipe, record,
    listed final files and real checkpoint folders are this tool's."""
    recipe_file = out / CONFIG_FILE
    if is_marked(out) or not recipe_file.is_file():
        return
    try:
        ours = recipe_file.read_text(encoding="utf-8").startswith("# Recipe as run by nexus-retrofit")
    except (OSError, UnicodeDecodeError):
        return
    if not ours:
        return
    record = _read_record(out) or {}
    names = [CONFIG_FILE, RUN_RECORD, *[n for n in record.get("files", []) if isinstance(n, str)]]
    names += [p.name for p in _checkpoints(out) if not p.is_symlink()]
    claim(out, [n for n in names if "/" not in n], "train", complete=bool(record.get("complete")))


def _check_ownership(out: Path) -> None:
    """output_dir holds nothing of anyone else's that the run would write or replace (the user's other
    files may stay: the run never touches them)."""
    if not out.is_dir():
        return
    _adopt_legacy(out)
    try:
        check_no_collisions(out, _train_writes, "output_dir")
    except OutputError as e:
        raise RecipeError(str(e)) from None


@dataclass
class OutputPlan:
    """What run_training will do to output_dir; decided before any data or model is loaded."""

    resume: str | None = None
    overwrite: bool = False  # overwrite_output_dir: remove what this tool wrote there (not the user's files)
    notes: list[str] = field(default_factory=list)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (bad header, or shorter than its header says), or None."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return f"{path.name} has no readable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"{path.name} is truncated"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a save killed midway), or None if it is complete.

    The Trainer writes trainer_state.json last, so its absence marks a torn save; the weights'
    headers and sizes and the optimizer archive are checked too (cheaply, without loading them).
    """
    import json
    import zipfile

    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")) and not (folder / "latest").is_file():
        return "no model weights"
    for path in weights:
        if (why := _safetensors_problem(path)) is not None:
            return why
    optimizer = folder / "optimizer.pt"
    if optimizer.exists() and not zipfile.is_zipfile(optimizer):  # torch.save archives end in a zip directory
        return "optimizer.pt is truncated"
    return None


def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def latest_complete_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from, and 'NAME (why)' for each newer torn one."""
    skipped = []
    for folder in _checkpoints(out):
        why = checkpoint_problem(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name} ({why})")
    return None, skipped


def check_location(out: Path) -> None:
    """output_dir must be a folder, not under a file, and not the current, home or a root folder."""
    try:
        check_output_location(out, "output_dir")
    except OutputError as e:
        raise RecipeError(str(e)) from None


def _resume_plan(out: Path, resume: str | bool, diff: list[str]) -> OutputPlan:
    notes = []
    if resume is True:
        last, skipped = latest_complete_checkpoint(out) if out.is_dir() else (None, [])
        if skipped:
            notes.append(f"resume_from_checkpoint: skipped torn checkpoint(s) {', '.join(skipped)}")
        if last is None:
            what = f"complete checkpoint (torn: {', '.join(skipped)})" if skipped else "checkpoint-* folder"
            raise RecipeError(f"resume_from_checkpoint: no {what} in output_dir {out} to resume from")
        resume = str(last)
    target = Path(resume)
    if not target.is_dir():
        raise RecipeError(f"resume_from_checkpoint: no such checkpoint folder: {target.resolve()}")
    why = checkpoint_problem(target)
    if why is not None:
        raise RecipeError(
            f"resume_from_checkpoint: {target} is incomplete ({why}); pick an earlier checkpoint"
        )
    if diff:
        raise RecipeError(
            f"resume_from_checkpoint: {out} holds a run of a different recipe ({'; '.join(diff)})"
        )
    return OutputPlan(resume=str(resume), notes=notes)


def plan_output_dir(recipe: Recipe) -> OutputPlan:
    """Validate output_dir against the recipe and decide what to do with it; writes nothing.

    A non-empty output_dir is accepted when it holds a run of the same recipe (same model, data and
    Nexus settings), to resume it or to rewrite its final model; otherwise only with
    overwrite_output_dir, which removes what this tool wrote there (never the user's entries) once
    everything has loaded. An entry of someone else's that the run would replace is always refused.
    """
    out = Path(recipe.training.output_dir)
    check_location(out)
    _check_ownership(out)
    resume = _resume_target(recipe.training.resume_from_checkpoint)
    entries = sum(owned_and_foreign(out), []) if out.is_dir() else []
    previous = _previous_identity(out)
    diff = _identity_diff(_identity(recipe), previous) if previous is not None else []

    if resume is not None:
        return _resume_plan(out, resume, diff)
    if not entries:
        return OutputPlan()
    if recipe.script.overwrite_output_dir:
        return OutputPlan(overwrite=True)
    if not is_marked(out):
        raise RecipeError(
            f"output_dir {out} is not empty and was not written by nexus-retrofit; pass "
            "--overwrite_output_dir true to write into it (its files stay), or choose another folder"
        )
    if previous is None or diff:
        why = (
            f"it holds a run of a different recipe ({'; '.join(diff)})"
            if diff
            else "it does not hold a run of this recipe"
        )
        raise RecipeError(
            f"output_dir {out} is not empty and {why}; pass --overwrite_output_dir true to replace it"
        )
    checkpoints = _checkpoints(out)
    if checkpoints:
        raise RecipeError(
            f"output_dir {out} holds checkpoints of this recipe (last: {checkpoints[0].name}): pass "
            "--resume_from_checkpoint true to continue the run, or --overwrite_output_dir true to start over"
        )
    return OutputPlan()


# --- run record: the folder says whether its final model belongs to its recipe -------------------


def _read_record(out: Path) -> dict[str, Any] | None:
    import json

    try:
        record = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _previous_final_files(out: Path) -> list[Path]:
    """The final-model files an earlier run of this tool wrote here (never anyone else's files)."""
    record = _read_record(out)
    if record is not None:
        names = [n for n in record.get("files", []) if isinstance(n, str) and "/" not in n]
        return [out / n for n in names if (out / n).is_file()]
    if not (out / CONFIG_FILE).is_file():
        return []  # not a folder this tool wrote
    return sorted({p for pattern in LEGACY_FINAL_FILES for p in out.glob(pattern) if p.is_file()})


def _snapshot(out: Path) -> dict[str, int]:
    """Top-level entries and their modification times, to tell what the run wrote."""
    return {p.name: p.lstat().st_mtime_ns for p in out.iterdir()} if out.is_dir() else {}


def begin_output(out: Path, plan: OutputPlan, recipe_text: str) -> dict[str, int]:
    """Before training (main process): mark the run incomplete, then clear what it replaces.

    The old final model goes first so that a run killed from here on leaves checkpoints and a record
    saying "incomplete", never the previous model beside the new recipe. Returns a snapshot of the
    folder's files, to tell what this run wrote.
    """
    import json

    out.mkdir(parents=True, exist_ok=True)
    if plan.overwrite and owned_and_foreign(out)[0]:
        notify_left(out, remove_owned(out))  # what this tool wrote, never the user's entries
        _log.warning("overwrite_output_dir: writing into %s (its earlier run removed)", out)
    owned = set(owned_and_foreign(out)[0])
    old = [p for p in _previous_final_files(out) if p.name in owned]  # read before the new record
    claim(out, [], "train", complete=False)  # marked before the first write
    atomic_write_text(
        out / RUN_RECORD, json.dumps({"format": RECORD_FORMAT, "complete": False, "files": []}, indent=2)
    )
    for path in old:
        if path.name not in (RUN_RECORD, CONFIG_FILE):
            path.unlink(missing_ok=True)
    atomic_write_text(out / CONFIG_FILE, recipe_text)
    claim(out, [RUN_RECORD, CONFIG_FILE], "train", complete=False)
    return _snapshot(out)


def finish_output(
    out: Path, before: dict[str, int], recipe_text: str, data: dict[str, Any] | None = None
) -> None:
    """After the final model is saved (main process): the recipe, then the record listing its files."""
    import json

    atomic_write_text(out / CONFIG_FILE, recipe_text)
    after = _snapshot(out)
    files = sorted(
        n for n, t in after.items() if (n != RUN_RECORD and before.get(n) != t) or n == CONFIG_FILE
    )
    record = {"format": RECORD_FORMAT, "complete": True, "files": [n for n in files if (out / n).is_file()]}
    if data is not None:
        record["data"] = data  # rows read, dropped (by reason) and kept
    atomic_write_text(out / RUN_RECORD, json.dumps(record, indent=2))
    claim(out, [*files, RUN_RECORD], "train", complete=True)
