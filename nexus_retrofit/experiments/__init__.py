"""CPU-sized experiments that test the paper's claims (arXiv 2512.03377), run by `nexus-retrofit experiment`.

* `expressivity`: Theorem 3.1 (linear bottleneck of attention) made concrete, with a token-wise
  nonlinear control that tells context mixing from mere nonlinearity.
* `multihop`: two-hop pointer chasing in one layer (the reasoning claim), parameter-matched, per task format.
* `retrofit`: pretrain standard -> convert -> fine-tune per retrofit mechanic, with its positive control.
* `ablation`: Table 2 in miniature on the embedded tiny model (TRL SFT through `nexus-retrofit train`).
* `scratch`: Tables 1-2 in miniature: tiny GPT-NeoX models from `init`, pretrained from scratch by
  `train`, scored zero-shot by lm-evaluation-harness on six tasks of a made-up world.

Each experiment module exposes `run(output_dir, quick=False, seeds=None, threads=1) -> ExperimentOutput`
and is imported only when run (torch stays out of `--help`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .common import ExperimentOutput, default_output_dir

# name -> module under nexus_retrofit.experiments that defines run(...)
EXPERIMENTS: dict[str, str] = {
    "expressivity": "expressivity",
    "multihop": "multihop",
    "ablation": "ablation",
    "retrofit": "retrofit",
    "scratch": "scratch",
}


def run_experiment(
    name: str,
    quick: bool = False,
    seeds: int | None = None,
    output_dir: Path | None = None,
    threads: int = 1,
) -> ExperimentOutput:
    """Run experiment `name` and write its JSON, markdown and PNG (default eval/results/experiments/<name>/)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(EXPERIMENTS)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    module = importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")
    out = Path(output_dir) if output_dir is not None else default_output_dir(name)
    return module.run(out, quick=quick, seeds=seeds, threads=threads)


__all__ = ["EXPERIMENTS", "ExperimentOutput", "run_experiment"]
