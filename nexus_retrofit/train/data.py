"""Training data: a Hub dataset by name, a local file or folder (offline), or an open-r1 mixture.

Rows are in one of TRL's formats: `messages` (conversational), `prompt`/`completion` (loss on the
completion only, TRL's default for that format) or plain `text`. A dataset that cannot be found
fails with the recipe key and the local path that was tried, before any model is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
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
                raise RecipeError(f"{key}: {path} is not a .jsonl, .json, .parquet or .csv file")
            return datasets.load_dataset(builder, data_files=str(path), streaming=streaming)
        if path.is_dir():
            if any((path / marker).exists() for marker in DISK_MARKERS):
                loaded = datasets.load_from_disk(str(path))
                return (
                    loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
                )
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
