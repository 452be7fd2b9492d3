"""What differs between the transformers releases the package supports, in one place."""

from __future__ import annotations

import inspect

from torch import nn

from .configuration_nexus import TESTED_TRANSFORMERS

__all__ = ["TESTED_TRANSFORMERS", "cache_keyword", "cache_kwargs"]


def cache_keyword(model: nn.Module) -> str:
    """The name under which `model.forward` takes a KV cache: `cache` from transformers 5.24,
    `past_key_values` before (5.24 keeps the old name as a deprecated alias until 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """`{keyword: cache}` for `model(...)`, without a deprecation warning on any supported release."""
    return {cache_keyword(model): cache}
