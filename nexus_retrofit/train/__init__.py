"""`nexus-retrofit train`: TRL SFT from an open-r1-style recipe, baseline or Nexus (see run.py)."""

from __future__ import annotations

from .errors import RecipeError
from .liger import register_liger
from .recipe import CONFIG_FILE, NexusScriptArguments, NexusTrainArguments, Recipe, parse_recipe
from .run import TrainResult, run_training

register_liger()  # Nexus model types get their family's Liger kernels (see liger.py)

__all__ = [
    "CONFIG_FILE",
    "NexusScriptArguments",
    "NexusTrainArguments",
    "Recipe",
    "RecipeError",
    "TrainResult",
    "parse_recipe",
    "run_training",
]
