"""Data of the tiny_arith task: the jsonl next to this file, wherever the folder is (no cache, no network).

lm-eval calls `custom_dataset` with the task's metadata and model arguments as keywords; they are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROWS = Path(__file__).resolve().parent / "tiny_arith.jsonl"


def load_tiny_arith(**_: Any) -> Any:
    """{"test": the 60 rows} as a datasets.DatasetDict."""
    import datasets

    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
