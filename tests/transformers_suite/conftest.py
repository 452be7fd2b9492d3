"""tests/transformers_suite: transformers' own model tests on the Nexus classes (docs/transformers-model-tests.md).

The stand-ins are copied next to the sdist's files by scripts/fetch_transformers_tests.py and hold no
tests, so pytest does not collect them here. A run whose `-m` deselects `transformers_suite` (the main
CI run) does not import the suite's module either: importing it fetches the sdist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

collect_ignore = ["standins"]
# marks transformers' test files use, registered in transformers' own conftest (not in the sdist)
HF_MARKS = (
    "torch_compile_test",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "is_training_test",
    "accelerate_tests",
)


def pytest_configure(config: pytest.Config) -> None:
    for mark in HF_MARKS:
        config.addinivalue_line("markers", f"{mark}: transformers' own test mark")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    markexpr = config.getoption("markexpr")
    if collection_path.name != "test_transformers_model_tests.py" or not markexpr:
        return None
    selected = Expression.compile(markexpr).evaluate(lambda mark: mark == "transformers_suite")
    return True if not selected else None
