"""Nexus model classes, registered with the transformers Auto classes.

With nexus_retrofit imported, `AutoModelForCausalLM.from_pretrained(path)` loads a Nexus checkpoint
through these classes without `trust_remote_code` (no downloaded code runs).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nexus import (
    NexusConfig,
    NexusLlamaConfig,
    NexusMistralConfig,
    NexusQwen2Config,
    NexusQwen3Config,
)
from .modeling_nexus import (
    NexusAttentionMixin,
    NexusLlamaForCausalLM,
    NexusLlamaModel,
    NexusMistralForCausalLM,
    NexusMistralModel,
    NexusQwen2ForCausalLM,
    NexusQwen2Model,
    NexusQwen3ForCausalLM,
    NexusQwen3Model,
)

# base model_type -> (Nexus config class, Nexus causal-LM class, Nexus base model class)
FAMILIES = {
    "qwen2": (NexusQwen2Config, NexusQwen2ForCausalLM, NexusQwen2Model),
    "llama": (NexusLlamaConfig, NexusLlamaForCausalLM, NexusLlamaModel),
    "mistral": (NexusMistralConfig, NexusMistralForCausalLM, NexusMistralModel),
    "qwen3": (NexusQwen3Config, NexusQwen3ForCausalLM, NexusQwen3Model),
}


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
