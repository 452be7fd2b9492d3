"""Shared plumbing of the experiments: seeding, thread limits, statistics and atomic output files.

Every experiment writes three files into its output folder (default
`eval/results/experiments/<name>/`): `results.json` (every number, every setting, the
environment), `results.md` (the tables) and `<name>.png` (the plot). Files are written to a
temporary name and renamed, so an interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_ROOT = Path("eval/results/experiments")


@dataclasses.dataclass(frozen=True)
class ExperimentOutput:
    """Where an experiment's outputs went, and what it measured (the JSON payload)."""

    name: str
    json_path: Path
    markdown_path: Path
    plot_path: Path
    results: dict[str, Any]


def default_output_dir(name: str) -> Path:
    return DEFAULT_ROOT / name


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (the experiments use only seeded generators after this)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def limit_threads(n: int = 1) -> int:
    """Cap torch's intra-op threads: these models are tiny and the CPU is shared. Returns the old cap."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float], digits: int = 3, scientific: bool = False) -> str:
    mean, std = mean_std(values)
    if scientific:
        return f"{mean:.{digits}g} ± {std:.{max(1, digits - 1)}g}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce the numbers."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    _atomic_write_bytes(
        path, (json.dumps(payload, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()
    )


def write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def save_figure(fig: Figure, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(
    name: str, output_dir: Path, results: dict[str, Any], markdown: str, fig: Figure
) -> ExperimentOutput:
    """Write results.json, results.md and <name>.png into output_dir."""
    output_dir = Path(output_dir)
    out = ExperimentOutput(
        name=name,
        json_path=output_dir / "results.json",
        markdown_path=output_dir / "results.md",
        plot_path=output_dir / f"{name}.png",
        results=results,
    )
    write_json(out.json_path, results)
    write_text(out.markdown_path, markdown)
    save_figure(fig, out.plot_path)
    return out
