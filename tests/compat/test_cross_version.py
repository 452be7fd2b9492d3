"""A checkpoint written under one supported transformers decodes identically under the others.

The Pythons to cross are this one plus those in NEXUS_COMPAT_PYTHONS (os.pathsep-separated), which
the README's test command sets to its oldest-transformers and vLLM environments. Every ordered pair
(writer, reader) is one case: the reader loads the checkpoint's bundled code without the package and
must give the writer's logits, cached decoding equal to its own full forward, and the same greedy
tokens. Without the variable the matrix is this Python with itself (still a real round trip).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("xv_worker.py")
PYTHONS = [sys.executable, *filter(None, os.environ.get("NEXUS_COMPAT_PYTHONS", "").split(os.pathsep))]
TIMEOUT_S = 300


def _run(python: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf"), "PYTHONPATH": ""}
    done = subprocess.run(
        [python, str(WORKER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{python} {args[0]} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@functools.cache
def _written(python: str, root: str) -> Path:
    """The checkpoints `python` writes, once per session and writer."""
    out = Path(root) / f"writer-{PYTHONS.index(python)}"
    out.mkdir(parents=True)
    _run(python, "write", str(out), cwd=out)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cross-version"))


@pytest.mark.parametrize("reader", PYTHONS, ids=lambda p: f"reader{PYTHONS.index(p)}")
@pytest.mark.parametrize("writer", PYTHONS, ids=lambda p: f"writer{PYTHONS.index(p)}")
def test_checkpoint_decodes_identically_across_versions(root, writer, reader):
    report = json.loads(_run(reader, "read", str(_written(writer, root)), cwd=Path(root)).splitlines()[-1])
    print(f"writer transformers {report['transformers']} -> reader {report['reader']}")
    for name, row in report.items():
        if isinstance(row, dict):
            assert row["full_vs_writer"] <= 1e-5, (name, report)
            assert row["incremental_vs_full"] <= 1e-4, (name, report)
            assert row["greedy_equal"], (name, report)
