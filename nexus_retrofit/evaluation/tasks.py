"""Benchmark tasks as small declarative objects, and the registry `eval` looks them up in.

A task says where its data lives, which columns hold what, the prompt and the grader. The built-in
ones follow docs/DESIGN.md §8 (open-r1's pinned lighteval prompts and sample counts). A user adds a
task without editing the package:

    from nexus_retrofit.evaluation import MATH_PROMPT, Task, register_task
    register_task(Task(name="arith", dataset="data/arith.jsonl", split="test",
                       columns={"problem": "problem", "answer": "answer"},
                       prompt=MATH_PROMPT, grader="math", num_samples=1))

or, from the command line, writes the same fields in a YAML/JSON file and passes `--task-file`
(declarative: no code from the file is run).

Two kinds of task, told apart by their columns:
- open answer: roles `problem` and `answer` (optional `solution`: its last `\\boxed{}` is the gold
  when `answer` is missing or empty); the prompt has a `{problem}` placeholder.
- multiple choice: roles `question`, `correct` and `incorrect` (a list of columns); choices are
  shuffled with a seeded per-question permutation and the gold is the correct choice's letter; the
  prompt has `{question}` and `{choices}` placeholders.
Any task may name an `id` column (a stable problem id recorded with the samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .answers import GPQA_PROMPT, LETTERS, MATH_PROMPT, last_boxed

OPEN_ROLES = ("problem", "answer", "solution", "id")
CHOICE_ROLES = ("question", "correct", "incorrect", "id")


class TaskError(ValueError):
    """A task definition or lookup is wrong; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark item, ready to prompt: the user message and the gold answer to grade against."""

    index: int  # position in the dataset split (before --limit)
    id: str
    prompt: str  # the user message (chat template not applied yet)
    gold: str  # math: the LaTeX answer; multiple choice: the correct letter


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark: data, columns, prompt, grader and default sample count.

    name: the key for `--tasks` and the `samples_<name>.jsonl` file.
    dataset: a Hub dataset id, or a local .jsonl/.parquet file (`--data-dir DIR` instead reads
        `DIR/<name>.jsonl` or `.parquet`).
    split, config, revision: Hub split, dataset config (subset) and a pinned revision (None: the
        latest, whose commit sha is resolved and recorded in results.json).
    columns: role -> dataset column (see the module docstring); `incorrect` takes a list of columns.
    prompt: the user message template, `{problem}` or `{question}` + `{choices}` are replaced
        literally (other braces, e.g. `\\boxed{ANSWER}`, stay as written).
    grader: a registered grader name ("math" or "multiple_choice" built in; see grading.py).
    num_samples: samples per problem for pass@1 when `--num-samples` is not given.
    """

    name: str
    dataset: str
    columns: Mapping[str, Any]
    prompt: str
    grader: str
    split: str = "test"
    config: str | None = None
    revision: str | None = None
    num_samples: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise TaskError(
                f"Task.name must be non-empty and use only letters, digits, '_', '-', '.'; got {self.name!r}"
            )
        if (
            not isinstance(self.num_samples, int)
            or isinstance(self.num_samples, bool)
            or self.num_samples < 1
        ):
            raise TaskError(
                f"task {self.name}: num_samples must be an integer >= 1, got {self.num_samples!r}"
            )
        columns = dict(self.columns)
        if "incorrect" in columns:
            incorrect = columns["incorrect"]
            if isinstance(incorrect, str) or not isinstance(incorrect, Sequence) or not incorrect:
                raise TaskError(
                    f"task {self.name}: columns['incorrect'] must be a non-empty list of column names"
                )
            columns["incorrect"] = tuple(incorrect)
        object.__setattr__(self, "columns", columns)
        if self.is_multiple_choice:
            required, allowed, placeholders = (
                ("question", "correct", "incorrect"),
                CHOICE_ROLES,
                ("{question}", "{choices}"),
            )
        else:
            required, allowed, placeholders = ("problem",), OPEN_ROLES, ("{problem}",)
            if "answer" not in columns and "solution" not in columns:
                raise TaskError(
                    f"task {self.name}: an open-answer task needs columns['answer'] (or columns['solution'], whose "
                    "last \\boxed{} is then the gold)"
                )
        missing = [r for r in required if r not in columns]
        unknown = sorted(set(columns) - set(allowed))
        if missing or unknown:
            raise TaskError(
                f"task {self.name}: columns must map the roles {list(required)} (optional: "
                f"{[r for r in allowed if r not in required]}); missing {missing}, unknown {unknown}"
            )
        absent = [p for p in placeholders if p not in self.prompt]
        if absent:
            raise TaskError(f"task {self.name}: the prompt template must contain {', '.join(absent)}")
        if self.is_multiple_choice and 1 + len(columns["incorrect"]) > len(LETTERS):
            raise TaskError(f"task {self.name}: at most {len(LETTERS)} choices")

    @property
    def is_multiple_choice(self) -> bool:
        return "question" in self.columns or "correct" in self.columns or "incorrect" in self.columns

    @property
    def num_choices(self) -> int:
        return 1 + len(self.columns["incorrect"]) if self.is_multiple_choice else 0

    def required_columns(self) -> list[str]:
        """Dataset columns that must exist (`solution` only when there is no `answer` column)."""
        c = self.columns
        if self.is_multiple_choice:
            return [c["question"], c["correct"], *c["incorrect"]]
        return [c["problem"], c["answer"] if "answer" in c else c["solution"]]

    def optional_columns(self) -> list[str]:
        c = self.columns
        roles = ("id",) if self.is_multiple_choice else ("id", "solution") if "answer" in c else ("id",)
        return [c[r] for r in roles if r in c]

    # ------------------------------------------------------------------------------------- problems
    def choice_conflict(self, row: Mapping[str, Any]) -> str | None:
        """Why a multiple-choice row cannot be asked: an empty choice, or two choices with the same text
        once whitespace is normalised (the grader could not tell the gold letter from its twin). None
        when the row is fine, or for an open-answer task."""
        if not self.is_multiple_choice:
            return None
        c = self.columns
        seen: dict[str, str] = {}
        for column in (c["correct"], *c["incorrect"]):
            value = row.get(column)
            text = " ".join(str(value).split()) if value is not None else ""
            if not text:
                return f"choice column {column!r} is empty"
            if text in seen:
                return (
                    f"choice columns {seen[text]!r} and {column!r} are both {text!r} "
                    "(after whitespace normalisation)"
                )
            seen[text] = column
        return None

    def problem(self, row: Mapping[str, Any], index: int, seed: int) -> Problem:
        """Build the prompt and gold of one dataset row (GPQA-style choices shuffled by `seed`)."""
        c = self.columns
        pid = str(row[c["id"]]) if "id" in c and row.get(c["id"]) is not None else str(index)
        if self.is_multiple_choice:
            conflict = self.choice_conflict(row)
            if conflict is not None:
                raise TaskError(
                    f"task {self.name}: row {index}: {conflict}; every choice must be distinct and non-empty"
                )
            question = _text(row, c["question"], index)
            options = [_text(row, c["correct"], index)] + [_text(row, col, index) for col in c["incorrect"]]
            order = choice_permutation(question, len(options), seed)  # order[k] = option shown at letter k
            rendered = "\n".join(f"{LETTERS[k]}) {options[o]}" for k, o in enumerate(order))
            prompt = self.prompt.replace("{question}", question).replace("{choices}", rendered)
            return Problem(index, pid, prompt, LETTERS[order.index(0)])
        prompt = self.prompt.replace("{problem}", _text(row, c["problem"], index))
        return Problem(index, pid, prompt, self.gold_answer(row, index))

    def gold_answer(self, row: Mapping[str, Any], index: int) -> str:
        c = self.columns
        answer = row.get(c["answer"]) if "answer" in c else None
        if answer is not None and str(answer).strip():
            return str(answer).strip()
        if "solution" in c and row.get(c["solution"]):
            boxed = last_boxed(str(row[c["solution"]]))
            if boxed:
                return boxed
        named = c.get("answer", c.get("solution"))
        raise TaskError(f"task {self.name}: row {index} has no gold answer (column {named!r} is empty)")

    # ---------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["columns"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.columns.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise TaskError(f"unknown Task field(s) {unknown}; allowed: {sorted(fields)}")
        data = dict(data)
        prompt = data.get("prompt")
        if prompt in PROMPTS:  # a task file may say `prompt: math` instead of pasting the text
            data["prompt"] = PROMPTS[prompt]
        try:
            return cls(**data)
        except TypeError as e:
            raise TaskError(f"task definition {dict(data).get('name', '?')!r}: {e}") from None


PROMPTS = {"math": MATH_PROMPT, "gpqa": GPQA_PROMPT}


def _text(row: Mapping[str, Any], column: str, index: int) -> str:
    value = row.get(column)
    if value is None:
        raise TaskError(f"row {index}: column {column!r} is empty")
    return str(value)


def stable_int(*parts: object) -> int:
    """A 63-bit integer from `parts`, the same on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def choice_permutation(question: str, num_choices: int, seed: int) -> list[int]:
    """Seeded permutation of the choices of one question: order[k] is the option shown at letter k.

    Keyed by the question text (not its row position), so it does not change with --limit or row
    order; each of the num_choices! orders is equally likely, so the gold letter is uniform.
    """
    order = list(range(num_choices))
    random.Random(stable_int("choices", seed, question)).shuffle(order)
    return order


# ----------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Make `task` available to `eval --tasks NAME` and `grade NAME` (in this process)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    if task.name in _REGISTRY and _REGISTRY[task.name] != task and not overwrite:
        raise TaskError(f"a different task named {task.name!r} is already registered; pass overwrite=True")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TaskError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))} (add your own with "
            "register_task() or --task-file)"
        ) from None


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def _parse_task_file(path: Path) -> tuple[Any, list[int | None]]:
    """The file's data and the line each top-level task starts on (YAML; None for JSON).

    Syntax errors become one-line TaskErrors naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"task file {path} cannot be read: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        from ..yaml_loading import DuplicateKeyError, load_yaml_document

        try:
            data, node = load_yaml_document(text, source=f"task file {path}")
        except DuplicateKeyError as e:
            raise TaskError(str(e)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise TaskError(f"task file {path}{where} is not valid YAML: {problem}") from None
        starts = (
            [item.start_mark.line + 1 for item in node.value]
            if isinstance(node, yaml.SequenceNode)
            else [node.start_mark.line + 1 if node is not None else None]
        )
        return data, starts
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise TaskError(f"task file {path} line {e.lineno} is not valid JSON: {e.msg}") from None
    except _DuplicateJSONKey as e:
        raise TaskError(_duplicate_json_key(path, text, e.key)) from None
    return data, [None] * (len(data) if isinstance(data, list) else 1)


class _DuplicateJSONKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads object_pairs_hook: a key stated twice in one object is an error, not the last value."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateJSONKey(key)
        data[key] = value
    return data


def _duplicate_json_key(path: Path, text: str, key: str) -> str:
    """The one-line error for a JSON key stated twice, with both lines when the YAML loader can read
    the file (JSON without tabs is YAML) to find them."""
    from ..yaml_loading import DuplicateKeyError, load_yaml

    try:
        load_yaml(text, source=f"task file {path}")
    except DuplicateKeyError as e:
        return str(e)
    except Exception:  # not readable as YAML: name the key without its lines
        pass
    return (
        f"task file {path}: duplicate key {key!r}; keep one of them (otherwise the last would silently win)"
    )


def load_task_file(path: str | Path) -> list[Task]:
    """Register the task(s) defined in a YAML or JSON file (one mapping, or a list of them).

    A relative `dataset` path that exists next to the file is resolved against the file's folder.
    Errors are one line naming the file, and the line (YAML) or position of the task.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    data, starts = _parse_task_file(path)
    items = data if isinstance(data, list) else [data]
    tasks = []
    for i, (item, line) in enumerate(zip(items, starts)):
        where = f"{path} line {line}" if line else f"{path} task {i + 1}"
        if not isinstance(item, Mapping):
            raise TaskError(f"{where}: each task must be a mapping of Task fields, got {type(item).__name__}")
        item = dict(item)
        local = path.parent / str(item.get("dataset", ""))
        if item.get("dataset") and not Path(item["dataset"]).is_absolute() and local.is_file():
            item["dataset"] = str(local.resolve())
        try:
            tasks.append(register_task(Task.from_dict(item), overwrite=True))
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
    return tasks


register_task(
    Task(
        name="math_500",
        dataset="HuggingFaceH4/MATH-500",
        split="test",
        columns={"problem": "problem", "answer": "answer", "solution": "solution", "id": "unique_id"},
        prompt=MATH_PROMPT,
        grader="math",
        num_samples=4,
        description="MATH-500 (Lightman et al.), 500 problems, math-verify",
    )
)
register_task(
    Task(
        name="aime24",
        dataset="HuggingFaceH4/aime_2024",
        split="train",
        columns={"problem": "problem", "answer": "answer", "id": "id"},
        prompt=MATH_PROMPT,
        grader="math",
        num_samples=64,
        description="AIME 2024, 30 problems, math-verify",
    )
)
register_task(
    Task(
        name="gpqa_diamond",
        dataset="Idavidrein/gpqa",
        config="gpqa_diamond",
        split="train",
        columns={
            "question": "Question",
            "correct": "Correct Answer",
            "incorrect": ["Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
            "id": "Record ID",
        },
        prompt=GPQA_PROMPT,
        grader="multiple_choice",
        num_samples=8,
        description="GPQA-Diamond, 198 questions (gated dataset), seeded choice shuffle",
    )
)
