"""`nexus-retrofit train`: TRL SFT from an open-r1-style recipe, baseline or Nexus (see run.py)."""

from .recipe import CONFIG_FILE, NexusScriptArguments, NexusTrainArguments, Recipe, RecipeError, parse_recipe
from .run import TrainResult, run_training

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
