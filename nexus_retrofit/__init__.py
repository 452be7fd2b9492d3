"""nexus-retrofit: upgrade pretrained LLMs to Nexus higher-order attention (arXiv 2512.03377)."""

from __future__ import annotations

from .converter import convert
from .initialization import init_from_config
from .modeling import FAMILIES, NexusConfig

__version__ = "0.1.0"

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

__all__ = ["NexusConfig", "SUPPORTED_MODEL_TYPES", "__version__", "convert", "init_from_config"]
