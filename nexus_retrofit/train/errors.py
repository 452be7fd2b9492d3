"""The error every step of `train` raises for input it cannot run (recipe, data, output folder)."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending key (or file and line) and the fix."""
