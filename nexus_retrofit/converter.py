"""Convert a pretrained transformers causal LM into a Nexus model (`convert(model, NexusConfig(...))`).

PEFT-style: validate everything before touching the model, then build the Nexus model on the meta
device and move the source tensors into it (no copy of the pretrained weights), so converting a
7B model needs no second copy of it in memory. Only the new inner modules and gates are allocated.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .modeling import FAMILIES, NexusAttentionMixin, NexusConfig
from .modeling.modeling_nexus import init_nexus_parameters
from .modeling.names import is_nexus_parameter


def _check_convertible(model: nn.Module) -> str:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert() expects a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if getattr(config, "nexus", None) is not None or str(model_type).startswith("nexus_"):
        raise ValueError(
            f"this model is already a Nexus model ({model_type}, settings {config.nexus}); convert the "
            "original base model instead"
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; supported model types: "
            f"{', '.join(FAMILIES)}"
        )
    expected = next(  # the family's own causal LM, e.g. Qwen2ForCausalLM
        c
        for c in FAMILIES[model_type][1].__mro__[1:]
        if issubclass(c, PreTrainedModel) and "Nexus" not in c.__name__
    )
    if not isinstance(model, expected):
        raise ValueError(
            f"convert() needs a causal LM ({expected.__name__}), got {type(model).__name__}; load the model "
            "with AutoModelForCausalLM"
        )
    return model_type


def nexus_model_config(base_config: PretrainedConfig, nexus: NexusConfig) -> PretrainedConfig:
    """The Nexus config for a base config: every base setting plus the `nexus` block."""
    config_cls = FAMILIES[base_config.model_type][0]
    fields = base_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "nexus", "base_model"):
        fields.pop(key, None)
    config = config_cls(**fields, nexus=nexus.to_dict(), base_model=base_config._name_or_path or None)
    config._attn_implementation = base_config._attn_implementation  # not part of to_dict()
    config._name_or_path = base_config._name_or_path
    return config


def _move_buffers(source: nn.Module, target: nn.Module) -> None:
    """Non-persistent buffers (RoPE inv_freq) are not in the state dict: take them from the source."""
    for name, buffer in source.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        module = target.get_submodule(module_name)
        if buffer_name in module._buffers:
            module._buffers[buffer_name] = buffer


def _materialise_nexus_parameters(model: PreTrainedModel, nexus: NexusConfig) -> None:
    """Allocate and initialise the inner modules (random or copied) and the gates of every layer."""
    for attention in model.modules():
        if not isinstance(attention, NexusAttentionMixin):
            continue
        reference = getattr(attention, attention.output_projection).weight  # o_proj (GPT-NeoX: dense)
        if hasattr(attention, "inner"):
            attention.inner.to_empty(device=reference.device)
            attention.inner.to(reference.dtype)
            for inner in attention.inner.values():
                if nexus.inner_init == "copy":  # start from the pretrained attention's q/k/v/o (and norms)
                    own = attention.state_dict()
                    inner.load_state_dict({name: own[name] for name in inner.state_dict()})
                else:  # random (paper) or zero_out: the family's init, then o_proj to 0 below
                    for module in inner.modules():
                        model._init_weights(module)
        if hasattr(attention, "gates"):
            attention.gates.to_empty(device=reference.device)
            attention.gates.to(reference.dtype)
        with torch.no_grad():
            init_nexus_parameters(attention)  # gates at their start value; zero_out o_proj at 0


def convert(model: PreTrainedModel, config: NexusConfig | None = None, **settings) -> PreTrainedModel:
    """Return the Nexus version of `model` (a causal LM of a family in nexus_retrofit/families.py).

    `config` is a NexusConfig, or pass its fields as keyword arguments. With a function-preserving
    setting (gate="zero", or gate="open" with inner_init="zero_out": the default) the result computes
    exactly what `model` computed. The source model's tensors are moved, not copied: do
    not use `model` afterwards. New parameters follow the global torch seed.
    """
    if config is not None and settings:
        raise ValueError("pass either a NexusConfig or keyword settings to convert(), not both")
    nexus = config if config is not None else NexusConfig(**settings)
    if not isinstance(nexus, NexusConfig):
        raise TypeError(f"config must be a NexusConfig, got {type(nexus).__name__}")
    model_type = _check_convertible(model)
    lm_cls = FAMILIES[model_type][1]
    new_config = nexus_model_config(model.config, nexus)

    with torch.device("meta"):
        new_model = lm_cls(new_config)
    missing, unexpected = new_model.load_state_dict(model.state_dict(), strict=False, assign=True)
    not_nexus = [k for k in missing if not is_nexus_parameter(k)]
    if unexpected or not_nexus:
        raise RuntimeError(
            f"conversion of {type(model).__name__} did not map its weights: unexpected {unexpected[:5]}, "
            f"missing {not_nexus[:5]}"
        )
    _move_buffers(model, new_model)
    if getattr(new_config, "tie_word_embeddings", False):
        new_model.tie_weights()
    _materialise_nexus_parameters(new_model, nexus)
    leftovers = [n for n, t in [*new_model.named_parameters(), *new_model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"conversion left tensors unallocated: {leftovers[:5]}")
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = model.generation_config
    new_model.train(model.training)
    return new_model
