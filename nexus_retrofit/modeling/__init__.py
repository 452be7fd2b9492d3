"""Nexus model classes, registered with the transformers Auto classes.

With nexus_retrofit imported, `AutoModelForCausalLM.from_pretrained(path)` loads a Nexus checkpoint
through these classes without `trust_remote_code` (no downloaded code runs).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..families import FAMILIES as FAMILY_STEMS
from ..families import class_names
from . import configuration_nexus, modeling_nexus
from .configuration_nexus import NexusConfig
from .modeling_nexus import NexusAttentionMixin

# base model_type -> (Nexus config class, Nexus causal-LM class, Nexus base model class), from the one
# family table (nexus_retrofit/families.py)
FAMILIES = {
    model_type: (
        getattr(configuration_nexus, class_names(model_type)[0]),
        getattr(modeling_nexus, class_names(model_type)[1]),
        getattr(modeling_nexus, class_names(model_type)[2]),
    )
    for model_type in FAMILY_STEMS
}
globals().update({cls.__name__: cls for classes in FAMILIES.values() for cls in classes})


def register() -> None:
    """Register every Nexus family with the Auto classes (idempotent)."""
    for config_cls, lm_cls, model_cls in FAMILIES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


register()

__all__ = [
    "FAMILIES",
    "NexusAttentionMixin",
    "NexusConfig",
    "register",
    *(cls.__name__ for classes in FAMILIES.values() for cls in classes),
]
