"""Training data: a Hub dataset by name, a local file or folder (offline), or an open-r1 mixture.

Rows are in one of TRL's formats: `messages` (conversational), `prompt`/`completion` (loss on the
completion only, TRL's default for that format) or plain `text`. A local `.txt` file is plain text
for pretraining: one `text` row per line (blank lines skipped), or per paragraph / for the whole file
with `dataset_config: paragraph | document` (datasets' text builder). A dataset that cannot be found
fails with the recipe key and the local path that was tried, before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import RecipeError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset
    from trl import SFTConfig

logger = logging.getLogger(__name__)


class DataArguments(Protocol):
    """The dataset fields of a recipe this module reads (recipe.NexusScriptArguments has them)."""

    dataset_name: str | None
    dataset_config: str | None
    dataset_mixture: dict | str | None
    dataset_streaming: bool
    dataset_train_split: str
    dataset_test_split: str


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TEXT_SAMPLING = ("line", "paragraph", "document")  # a .txt file's rows: dataset_config picks one
# Roles chat templates know; anything else (a typo such as "asistant") would be rendered or dropped
# by the template and trained on silently.
CHAT_ROLES = ("system", "user", "assistant", "tool")
DISK_MARKERS = ("dataset_dict.json", "state.json")  # folders written by Dataset(Dict).save_to_disk


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of an open-r1 `dataset_mixture`."""

    id: str
    config: str | None = None
    split: str = "train"
    columns: tuple[str, ...] | None = None
    weight: float | None = None


@dataclass(frozen=True)
class MixtureSpec:
    """open-r1's `dataset_mixture`: datasets, shuffle/subsample seed, optional test split."""

    datasets: tuple[DatasetSpec, ...]
    seed: int = 0
    test_split_size: float | int | None = None


def parse_mixture(raw: dict[str, Any]) -> MixtureSpec:
    """Validate a `dataset_mixture` mapping; errors name the offending key."""
    if not isinstance(raw, dict):
        raise RecipeError(f"dataset_mixture must be a mapping with a `datasets` list, got {raw!r}")
    unknown = sorted(set(raw) - {"datasets", "seed", "test_split_size"})
    if unknown:
        raise RecipeError(
            f"unknown key(s) in dataset_mixture: {unknown}; allowed: datasets, seed, test_split_size"
        )
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(
            "dataset_mixture.datasets must be a non-empty list of {id, config, split, columns, weight}"
        )
    specs = []
    allowed = ("id", "config", "split", "columns", "weight")
    for i, entry in enumerate(entries):
        where = f"dataset_mixture.datasets[{i}]"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where} must be a mapping with at least an `id`, got {entry!r}")
        bad = sorted(set(entry) - set(allowed))
        if bad:
            raise RecipeError(f"unknown key(s) in {where}: {bad}; allowed: {list(allowed)}")
        if not entry.get("id"):
            raise RecipeError(f"{where}.id is required: a Hub dataset id or a local file or folder")
        weight = entry.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1
        ):
            raise RecipeError(f"{where}.weight must be a fraction in (0, 1], got {weight!r}")
        columns = entry.get("columns")
        if columns is not None and (
            not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)
        ):
            raise RecipeError(f"{where}.columns must be a list of column names, got {columns!r}")
        specs.append(
            DatasetSpec(
                id=str(entry["id"]),
                config=entry.get("config"),
                split=str(entry.get("split", "train")),
                columns=tuple(columns) if columns else None,
                weight=None if weight is None else float(weight),
            )
        )
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"dataset_mixture.seed must be an integer, got {seed!r}")
    test = raw.get("test_split_size")
    if test is not None and (isinstance(test, bool) or not isinstance(test, (int, float)) or test <= 0):
        raise RecipeError(
            f"dataset_mixture.test_split_size must be a fraction in (0, 1) or a row count, got {test!r}"
        )
    return MixtureSpec(datasets=tuple(specs), seed=seed, test_split_size=test)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in LOCAL_FORMATS


def load_source(name: str, config: str | None, key: str, streaming: bool = False) -> DatasetDict:
    """Load `name` as a local file/folder if it exists, else from the Hub; errors name `key`."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise RecipeError(f"{key}: {path} is not a .jsonl, .json, .parquet, .csv or .txt file")
            check_local_text(path, key)
            if builder == "text":
                return _load_text(path, config, streaming)
            return datasets.load_dataset(builder, data_files=str(path), streaming=streaming)
        if path.is_dir():
            if any((path / marker).exists() for marker in DISK_MARKERS):
                loaded = datasets.load_from_disk(str(path))
                return (
                    loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
                )
            check_local_text(path, key)
            return datasets.load_dataset(str(path), name=config, streaming=streaming)
    except RecipeError:
        raise
    except Exception as e:  # a local file that exists but does not parse
        raise RecipeError(f"{key}: could not read {path.resolve()}: {type(e).__name__}: {e}") from None
    if _looks_local(name):
        raise RecipeError(f"{key}: no such file or folder: {path.resolve()}")
    try:
        return datasets.load_dataset(name, name=config, streaming=streaming)
    except Exception as e:
        raise RecipeError(
            f"{key} {name!r} is not a local file or folder (tried {path.resolve()}) and could not be loaded "
            f"from the Hugging Face Hub: {type(e).__name__}: {e}"
        ) from None


def _load_text(path: Path, config: str | None, streaming: bool) -> DatasetDict:
    """A plain-text file as `text` rows: per line (default), paragraph or document; blank rows skipped
    (a blank line would train on a lone EOS token)."""
    import datasets

    sample_by = config or "line"
    if sample_by not in TEXT_SAMPLING:
        raise RecipeError(
            f"dataset_config: a .txt dataset is read by {', '.join(TEXT_SAMPLING)} (one row each), got {config!r}"
        )
    data = datasets.load_dataset("text", data_files=str(path), sample_by=sample_by, streaming=streaming)
    return data.filter(lambda row: bool(row["text"].strip()))


def _split(data: DatasetDict, split: str, key: str) -> Dataset:
    if split not in data:
        raise RecipeError(f"{key}: split {split!r} not found; the dataset has {sorted(data)}")
    return data[split]


def _row_location(name: str, split: str, row: int) -> str:
    """'FILE line N' for a local .jsonl (blank lines skipped, as the loader does), else 'NAME SPLIT row N'."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        seen = -1
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == row:
                    return f"{path.resolve()} line {number}"
    return f"{name} ({split} split) row {row + 1}"


def check_roles(ds: Dataset | IterableDataset, name: str, split: str, key: str) -> None:
    """Refuse conversational rows whose messages have a role outside CHAT_ROLES (or no role).

    Runs on the Arrow column (no Python loop over rows), before any subsampling, so that the row
    number maps back to the file. Streamed datasets are not scanned.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = getattr(ds, "data", None)
    if table is None or "messages" not in (ds.column_names or ()):
        return
    column = table.column("messages").combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise RecipeError(f"{key}: the `messages` column of {name} must hold lists of {{role, content}}")
    item = column.type.value_type
    if not pa.types.is_struct(item) or item.get_field_index("role") < 0:
        raise RecipeError(f"{key}: every message in {name} needs a `role` (found {item})")
    roles = pc.struct_field(pc.list_flatten(column), "role").cast(pa.string())
    known = pc.fill_null(pc.is_in(roles, value_set=pa.array(CHAT_ROLES)), False)
    if pc.all(known).as_py() is not False:
        return
    first = pc.index(known, False).as_py()
    row = pc.list_parent_indices(column)[first].as_py()
    role = roles[first].as_py()
    raise RecipeError(
        f"{key}: {_row_location(name, split, row)}: unknown chat role {role!r}; "
        f"roles must be one of {', '.join(CHAT_ROLES)}"
    )


def load_mixture(spec: MixtureSpec) -> DatasetDict:
    """open-r1's mixture: subsample each dataset by weight, concatenate, shuffle, optionally split."""
    import datasets

    parts = []
    for i, entry in enumerate(spec.datasets):
        where = f"dataset_mixture.datasets[{i}]"
        ds = _split(load_source(entry.id, entry.config, f"{where}.id"), entry.split, f"{where}.split")
        check_roles(ds, entry.id, entry.split, f"{where}.id")
        if entry.columns is not None:
            missing = sorted(set(entry.columns) - set(ds.column_names))
            if missing:
                raise RecipeError(
                    f"{where}.columns: {missing} not in {entry.id} (columns: {ds.column_names})"
                )
            ds = ds.select_columns(list(entry.columns))
        if entry.weight is not None:
            ds = ds.shuffle(seed=spec.seed).select(range(max(1, int(len(ds) * entry.weight))))
        logger.info("dataset mixture: %s (%s) -> %d rows", entry.id, entry.split, len(ds))
        parts.append(ds)
    try:
        combined = datasets.concatenate_datasets(parts).shuffle(seed=spec.seed)
    except ValueError as e:
        raise RecipeError(
            f"dataset_mixture: the datasets do not share columns ({e}); select common `columns`"
        ) from None
    if spec.test_split_size is not None:
        return combined.train_test_split(test_size=spec.test_split_size, seed=spec.seed)
    return datasets.DatasetDict(train=combined)


def check_format(ds: Dataset | IterableDataset, text_field: str, key: str) -> str:
    """The dataset's TRL format, or an error listing the columns it has."""
    columns = set(ds.column_names or ())
    if not columns:  # a streamed dataset without known features: TRL will tell
        return "unknown"
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if text_field in columns:
        return "text"
    raise RecipeError(
        f"{key}: rows need a `messages` column (conversational), `prompt` and `completion` columns, or a "
        f"`{text_field}` column (dataset_text_field); found {sorted(columns)}"
    )


def load_datasets(
    script: DataArguments, training: SFTConfig
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None, str]:
    """Train and (when evaluating) eval datasets for parsed ScriptArguments and SFTConfig, and their format."""
    if script.dataset_mixture:
        if script.dataset_name:
            logger.warning("both dataset_mixture and dataset_name are set: using dataset_mixture")
        data = load_mixture(parse_mixture(script.dataset_mixture))
        key, test_split = "dataset_mixture", "test"
    else:
        data = load_source(
            script.dataset_name, script.dataset_config, "dataset_name", script.dataset_streaming
        )
        key, test_split = "dataset_name", script.dataset_test_split
    train_split = script.dataset_train_split if not script.dataset_mixture else "train"
    train = _split(data, train_split, "dataset_train_split")
    if not script.dataset_mixture:  # mixture parts were checked before they were subsampled
        check_roles(train, script.dataset_name, train_split, key)
    fmt = check_format(train, training.dataset_text_field, key)
    logger.info("training data: %s format, %s rows", fmt, getattr(train, "num_rows", "streamed"))
    evaluate = str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no"
    eval_ds = (
        _split(data, test_split, "dataset_test_split (or dataset_mixture.test_split_size)")
        if evaluate
        else None
    )
    if eval_ds is not None and not script.dataset_mixture:
        check_roles(eval_ds, script.dataset_name, test_split, key)
    return train, eval_ds, fmt


# --- UTF-8 check of local text files --------------------------------------------------------------

TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")  # read without validating UTF-8 first


def check_utf8(path: Path, key: str) -> None:
    """Refuse a local text data file that is not UTF-8: one line naming the file, line and byte offset.

    The Arrow readers accept such a file and fail only when a row is read (in the middle of training
    setup, after the output folder was written), so it is read once here, in 1 MiB blocks.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                _not_utf8(path, key, offset - pending + e.start, e.reason)
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            _not_utf8(path, key, offset - len(decoder.getstate()[0]) + e.start, e.reason)


def _not_utf8(path: Path, key: str, at: int, reason: str) -> None:
    with open(path, "rb") as f:
        head = f.read(at)
    line, column = head.count(b"\n") + 1, at - (head.rfind(b"\n") + 1) + 1
    raise RecipeError(
        f"{key}: {path.resolve()} is not UTF-8 text: line {line}, byte {column} of the line (offset {at} in the "
        f"file): {reason}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
    )


def check_local_text(path: Path, key: str) -> None:
    """check_utf8 on a local data file, or on every .jsonl/.json/.csv/.txt file under a local folder."""
    if path.is_file():
        files = [path]
    else:  # the files load_dataset(folder) reads: hidden ones (.cache, .git) are skipped
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            check_utf8(file, key)


# --- data accounting: what SFTTrainer will train on, row by row -----------------------------------

TRUNCATED = "completion truncated away by max_length"
EMPTY = "empty completion"
WRONG_ROLES = "last turn not the assistant's"
REASONS = (TRUNCATED, EMPTY, WRONG_ROLES)
FIXES = {
    TRUNCATED: "raise --max_length to {needed}",
    EMPTY: "fix or remove those rows",
    WRONG_ROLES: "fix or remove those rows",
}
EXAMPLES = 3  # row numbers named per reason


@dataclass(frozen=True)
class DataReport:
    """What SFTTrainer will learn from a dataset: rows read, dropped (no completion tokens to learn
    from, by reason) and kept. `dropped` rows are dropped by TRL (prompt-completion rows whose
    completion was truncated away) or would train without a completion (the others): see
    `without_dropped`. `cut` counts kept rows whose completion max_length shortens."""

    dataset: str
    format: str
    rows: int
    kept: int
    dropped: dict[str, int]  # reason -> rows
    dropped_rows: tuple[int, ...] = ()  # positions in the dataset, ascending
    examples: dict[str, tuple[int, ...]] = field(default_factory=dict)  # reason -> first positions
    cut: int = 0
    max_length: int | None = None
    needed_max_length: int | None = None  # the max_length that keeps every truncated completion whole
    checked: bool = True
    note: str = ""

    @property
    def lost(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """The counts, for the run record (no row positions beyond the examples)."""
        return {
            "dataset": self.dataset,
            "format": self.format,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "completion_cut": self.cut,
            "max_length": self.max_length,
            "needed_max_length": self.needed_max_length,
            "checked": self.checked,
            **({"note": self.note} if self.note else {}),
        }

    def summary(self) -> str:
        """One line for the log."""
        if not self.checked:
            return f"training data {self.dataset}: not checked ({self.note})"
        line = f"training data {self.dataset} ({self.format}): {self.rows} rows read, {self.kept} kept"
        if self.lost:
            line += f", {self.lost} dropped (" + ", ".join(f"{n} {r}" for r, n in self.dropped.items()) + ")"
        if self.cut:
            line += f"; {self.cut} kept rows have their completion shortened by max_length {self.max_length}"
        return line

    def without_dropped(self, dataset: Dataset) -> Dataset:
        """`dataset` without the dropped rows (the same dataset when none were)."""
        if not self.dropped_rows:
            return dataset
        drop = set(self.dropped_rows)
        return dataset.select([i for i in range(len(dataset)) if i not in drop])


def _content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "") if isinstance(part, dict) else str(part or "") for part in content
        )
    return "" if content is None else str(content)


def _row_problem(row: dict[str, Any], prompt_completion: bool, eos: str | None) -> str | None:
    """WRONG_ROLES or EMPTY for a raw row, or None (the row has a completion to learn from)."""
    if prompt_completion:
        completion = row.get("completion")
        if isinstance(completion, list):  # conversational prompt-completion
            if not completion or not isinstance(completion[-1], dict):
                return EMPTY if not completion else WRONG_ROLES
            if completion[-1].get("role") != "assistant":
                return WRONG_ROLES
            return None if any(_content_text(m.get("content")).strip() for m in completion) else EMPTY
        text = "" if completion is None else str(completion)
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
        return None if text.strip() else EMPTY
    messages = row.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return WRONG_ROLES
    return None if _content_text(last.get("content")).strip() else EMPTY


def _kept_slice(training: SFTConfig, packing: bool) -> slice:
    """The token positions of a row that reach the model, as SFTTrainer truncates (or packs) it."""
    n = training.max_length
    if n is None:
        return slice(None)
    if packing:  # "bfd" truncates overflow at the end; "bfd_split" and "wrapped" keep every token
        return slice(None, n) if training.packing_strategy == "bfd" else slice(None)
    return slice(-n, None) if training.truncation_mode == "keep_end" else slice(None, n)


def _chat_template_problem(tokenizer: Any, training: SFTConfig) -> tuple[Any, str | None]:
    """The tokenizer as SFTTrainer will use it for chat data (with chat_template_path applied), or
    why the rows cannot be checked."""
    path = training.chat_template_path
    if path is None:
        return tokenizer, None
    if Path(path).is_file() and str(path).endswith((".jinja", ".j2")):
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        return tokenizer, None
    return tokenizer, f"chat_template_path {path!r} is cloned from a model when the trainer starts"


def account_rows(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    script: DataArguments,
    training: SFTConfig,
    *,
    split: str | None = None,
    max_dropped_share: float | None = None,
    evaluation: bool = False,
) -> DataReport:
    """Count what SFTTrainer will learn from `dataset`, and refuse a dataset that loses rows.

    The rows are templated and tokenized by TRL's own SFTTrainer preparation (the same maps, so its
    cache serves the trainer afterwards), then truncated as the trainer truncates them (max_length,
    truncation_mode, packing). A row is dropped when it has no completion token left to learn from:
    its completion (the `completion` column, or the last assistant turn of `messages`) is truncated
    away by max_length, is empty, or is not the assistant's (the last turn is the user's). Raises
    RecipeError, one line naming the count, the reason, the dataset and the fix, when the dropped
    share exceeds `max_dropped_share` (default: the recipe's dataset_max_dropped_share, 0: any
    dropped row is an error); also when conversational rows meet a tokenizer without a chat
    template. `evaluation` checks an eval dataset (eval_packing). Streamed datasets are not checked.
    """
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    if max_dropped_share is None:
        max_dropped_share = float(getattr(script, "dataset_max_dropped_share", 0.0) or 0.0)
    mixture = bool(script.dataset_mixture)
    name = "dataset_mixture" if mixture else str(script.dataset_name)
    key = "dataset_mixture" if mixture else "dataset_name"
    if split is None:
        split = (
            ("test" if mixture else script.dataset_test_split)
            if evaluation
            else ("train" if mixture else script.dataset_train_split)
        )
    where = f"{name} ({split} split)"
    packing = bool(
        training.packing if not evaluation or training.eval_packing is None else training.eval_packing
    )
    if not hasattr(dataset, "__len__"):
        return DataReport(where, "unknown", 0, 0, {}, checked=False, note="streamed rows are not counted")
    total = len(dataset)
    if total == 0:
        raise RecipeError(f"{key}: {where} has no rows")
    columns = set(dataset.column_names or ())
    first = dataset[0]
    prompt_completion = "prompt" in columns  # SFTTrainer's test, before it looks at `messages`
    conversational = is_conversational(first)
    fmt = "prompt-completion" if prompt_completion else "messages" if "messages" in columns else "text"
    if conversational and fmt != "text":
        fmt += " (conversational)" if prompt_completion else ""
        tokenizer, unchecked = _chat_template_problem(tokenizer, training)
        if unchecked:
            return DataReport(where, fmt, total, total, {}, checked=False, note=unchecked)
        if not tokenizer.chat_template:
            raise RecipeError(
                f"{key}: {where} holds conversational rows ({fmt}) but the tokenizer of "
                f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template: set chat_template "
                "(or chat_template_path) in the recipe"
            )
    if fmt == "text" or (prompt_completion and "completion" not in columns):
        return DataReport(where, fmt, total, total, {}, max_length=training.max_length)

    # 1. rows without an assistant completion, from the raw rows
    eos = getattr(tokenizer, "eos_token", None)
    wanted = ["prompt", "completion"] if prompt_completion else ["messages"]
    problems: dict[int, str] = {}
    position = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in wanted)):
            problem = _row_problem(dict(zip(wanted, values)), prompt_completion, eos)
            if problem is not None:
                problems[position] = problem
            position += 1

    # 2. the others, tokenized by SFTTrainer's own preparation, untruncated and in order
    good = [i for i in range(total) if i not in problems]
    lengths: dict[int, int] = {}  # full token length of each row whose completion was truncated away
    cut = 0
    if good:
        prepared = _prepare_like_sft_trainer(
            dataset if not problems else dataset.select(good),
            tokenizer,
            training,
            conversational,
            f"{split} (row accounting)",
            where,
            key,
        )
        kept_positions = _kept_slice(training, packing)
        truncating = kept_positions != slice(None)
        row_columns = ["input_ids", "labels"] + (
            ["completion_mask"] if "completion_mask" in prepared.column_names else []
        )
        row_columns += [] if prompt_completion else ["messages"]
        extra = [c for c in ("tools", "chat_template_kwargs") if c in prepared.column_names]
        index = 0
        for batch in prepared.select_columns(row_columns + extra).iter(batch_size=256):
            for values in zip(*(batch[c] for c in row_columns + extra)):
                row = dict(zip(row_columns + extra, values))
                position = good[index]
                index += 1
                ids, labels = row["input_ids"], row["labels"]
                if not truncating or (training.max_length is not None and len(ids) <= training.max_length):
                    continue
                if prompt_completion:
                    mask = row.get("completion_mask") or [1] * len(ids)
                else:  # the last assistant turn starts where the prompt alone stops matching
                    tools = row.get("tools")
                    prompt_ids = _tokenize(
                        tokenizer,
                        row["messages"][:-1],
                        add_generation_prompt=True,
                        chat_template=_training_template(tokenizer, training),
                        tools=json.loads(tools) if isinstance(tools, str) else tools,
                        **(row.get("chat_template_kwargs") or {}),
                    )["input_ids"]
                    start = common_prefix_length(prompt_ids, ids)
                    mask = [0] * start + [1] * (len(ids) - start)
                trained = [m and label != -100 for m, label in zip(mask, labels)]
                if not any(trained[kept_positions]):
                    problems[position] = TRUNCATED
                    lengths[position] = len(ids)
                elif sum(trained[kept_positions]) < sum(trained):
                    cut += 1  # kept, with a shortened completion

    dropped = {reason: sum(1 for p in problems.values() if p == reason) for reason in REASONS}
    dropped = {reason: n for reason, n in dropped.items() if n}
    examples = {
        reason: tuple(sorted(i for i, p in problems.items() if p == reason)[:EXAMPLES]) for reason in dropped
    }
    report = DataReport(
        dataset=where,
        format=fmt,
        rows=total,
        kept=total - len(problems),
        dropped=dropped,
        dropped_rows=tuple(sorted(problems)),
        examples=examples,
        cut=cut,
        max_length=training.max_length,
        needed_max_length=max(lengths.values()) if lengths else None,
    )
    if report.lost and report.lost > max_dropped_share * total:
        raise RecipeError(_refusal(report, key, name, split, mixture, max_dropped_share))
    return report


def _training_template(tokenizer: Any, training: SFTConfig) -> str | None:
    """The chat template SFTTrainer passes when tokenizing (a generation-marked copy for assistant_only_loss)."""
    if not training.assistant_only_loss:
        return None
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    return get_training_chat_template(tokenizer)


def _prepare_like_sft_trainer(
    dataset: Dataset,
    tokenizer: Any,
    training: SFTConfig,
    conversational: bool,
    label: str,
    where: str,
    key: str,
) -> Dataset:
    """SFTTrainer._prepare_dataset on `dataset`, without truncation, packing or shuffling (so that row
    i of the result is row i of the input). It is TRL's own code: ChatML conversion, EOS, the chat
    template, the completion and assistant masks, and the labels they give."""
    import copy
    from types import SimpleNamespace

    from trl import SFTTrainer

    args = copy.copy(training)
    args.max_length, args.packing, args.shuffle_dataset = None, False, False
    first = dataset[0]
    completion_only = training.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in first and "completion" in first
    trainer = SimpleNamespace(  # the attributes _prepare_dataset reads (TRL 1.16)
        _tokenizer=tokenizer,
        chat_template=_training_template(tokenizer, training) if conversational else None,
        completion_only_loss=completion_only,
        args=args,
    )
    try:
        return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, False, None, label)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RecipeError(
            f"{key}: the rows of {where} cannot be tokenized as SFTTrainer tokenizes them: "
            f"{type(e).__name__}: {message}"
        ) from None


def _refusal(
    report: DataReport, key: str, name: str, split: str, mixture: bool, max_dropped_share: float
) -> str:
    """One line: how many rows, why, where (the first rows), and the fix."""
    parts, fixes = [], []
    for reason, n in report.dropped.items():
        rows = ", ".join(
            _row_location(name, split, i) if not mixture else f"row {i + 1} of the mixture"
            for i in report.examples[reason]
        )
        more = f" and {n - len(report.examples[reason])} more" if n > len(report.examples[reason]) else ""
        parts.append(f"{n} {reason} ({rows}{more})")
        fix = FIXES[reason].format(needed=report.needed_max_length)
        if fix not in fixes:
            fixes.append(fix)
    allowed = f"dataset_max_dropped_share is {max_dropped_share:g}"
    needed = math.ceil(report.lost / report.rows * 1000) / 1000  # rounded up: it must admit the loss
    fixes.append(f"or accept the loss with --dataset_max_dropped_share {needed:g}")
    return (
        f"{key}: {report.lost} of {report.rows} rows of {report.dataset} have no completion tokens to train on "
        f"(max_length {report.max_length}): {'; '.join(parts)} ({allowed}). Fix: " + ", ".join(fixes)
    )
