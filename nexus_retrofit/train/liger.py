"""Liger kernels on both arms: a Nexus model gets the same Liger patches as its family's base model.

transformers' Trainer (and so TRL's SFTTrainer) applies Liger with
`liger_kernel.transformers._apply_liger_kernel_to_instance(model, **liger_kernel_config)`, which looks
`model.config.model_type` up in `liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN`
and silently does nothing for a type it does not know, such as `nexus_qwen2`. Left alone, the baseline
would train with fused RMSNorm/SwiGLU kernels and the Nexus model without them: a speed and memory gap
that has nothing to do with Nexus. `register_liger()` (run when `nexus_retrofit.train` is imported) adds
every Nexus model type to that table, so no trainer code has to call anything.

Why the table and not our own call: Trainer and TRL keep calling Liger their way, so a new Liger
release that changes its family functions (new kernels, new keyword arguments) reaches the Nexus model
exactly as it reaches the base model. Each Nexus entry is a thin wrapper with the family function's
signature (Liger passes only the keyword arguments that signature names) that calls the family's
current table entry, then gives the Nexus-only modules the patch their siblings got.

What is patched on a Nexus model (the family function walks `model.model.layers`; a Nexus model is a
subclass of the family's, so its isinstance checks hold):
- RMSNorm (final, input and post-attention norms; Qwen3's q_norm/k_norm), SwiGLU MLP, and the causal-LM
  forward when fused linear cross-entropy is on (TRL turns that one off for both arms): as the base.
- Qwen3's q_norm/k_norm of the `separate` inner attention modules, which the family function does not
  reach: given the same patch as the layer's own (`_mirror_patches`).
- RoPE as well: Liger swaps the module-level `apply_rotary_pos_emb` of the family's modeling file, and
  the Nexus attention calls that very name at call time (`modeling_nexus.family_rotary`), so its outer
  and inner attentions get Liger's rotary kernel as the base attention does. Liger rotates a contiguous
  copy of q and k in place; the Nexus attention hands it slices of stacked heads, never contiguous, so
  the tensors it reads again (the `self` reading's values, projections of X reused at later levels)
  are not touched.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable
from types import MethodType
from typing import Any

from torch import nn

from ..modeling import FAMILIES, NexusAttentionMixin

logger = logging.getLogger(__name__)

LIGER_TABLE_MODULE = "liger_kernel.transformers.monkey_patch"
LIGER_TABLE_NAME = "MODEL_TYPE_TO_APPLY_LIGER_FN"

# Nexus model type -> its family's model type, from the registered config classes (not spelled out twice)
NEXUS_TO_FAMILY: dict[str, str] = {classes[0].model_type: family for family, classes in FAMILIES.items()}


def liger_table() -> dict[str, Callable] | None:
    """Liger's model-type -> apply-function table, or None where liger-kernel is absent or broken."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        module = importlib.import_module(LIGER_TABLE_MODULE)
    except Exception as e:  # e.g. a triton that does not import here: training without Liger still works
        logger.warning("liger-kernel is installed but %s does not import (%s)", LIGER_TABLE_MODULE, e)
        return None
    table = getattr(module, LIGER_TABLE_NAME, None)
    return table if isinstance(table, dict) else None


def register_liger(table: dict[str, Callable] | None = None) -> list[str]:
    """Add every Nexus model type whose family Liger supports to Liger's table (idempotent).

    Returns the Nexus model types registered. An entry Liger itself ships for a Nexus type is kept.
    """
    table = liger_table() if table is None else table
    if table is None:
        return []
    registered = []
    for nexus_type, family in NEXUS_TO_FAMILY.items():
        family_fn = table.get(family)
        if family_fn is None:
            continue  # this Liger release has no kernels for the family: none for the base model either
        current = table.get(nexus_type)
        if current is None or getattr(current, "_nexus_family", None) is not None:
            table[nexus_type] = _nexus_apply_fn(table, family, family_fn)
            registered.append(nexus_type)
    return registered


def _nexus_apply_fn(table: dict[str, Callable], family: str, family_fn: Callable) -> Callable:
    """The family's apply function for a Nexus model: same signature, then the Nexus-only modules."""

    @functools.wraps(family_fn)  # inspect.signature follows __wrapped__: Liger filters kwargs by it
    def apply(*args: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        table.get(family, family_fn)(*args, model=model, **kwargs)  # the family's entry at call time
        if model is None:
            return
        mirrored = _mirror_patches(model)
        if mirrored:
            logger.info("Liger: gave %d Nexus inner module(s) their layer's patch", mirrored)

    apply._nexus_family = family
    return apply


def is_patched(module: nn.Module) -> bool:
    """Liger patches an existing module by binding its own forward onto the instance."""
    return "forward" in vars(module)


def patched_modules(model: nn.Module) -> dict[str, str]:
    """{module path: qualified name of the forward bound onto it} for every instance-patched module."""
    return {
        name: getattr(module.forward, "__qualname__", repr(module.forward))
        for name, module in model.named_modules()
        if is_patched(module)
    }


def _mirror_patches(model: nn.Module) -> int:
    """Give each module inside a Nexus inner attention the patch of its counterpart in the layer's own
    attention (`self_attn.inner.q.q_norm` <- `self_attn.q_norm`); returns how many it patched.

    The family function walks the decoder layers it knows and never reaches the inner modules. Only
    counterparts are mirrored, so a Nexus model gets no patch its base model does not have. A patch is
    what Liger set on the instance (its forward and settings such as casting_mode), methods rebound.
    """
    count = 0
    for attention in model.modules():
        if not isinstance(attention, NexusAttentionMixin) or not hasattr(attention, "inner"):
            continue
        for inner in attention.inner.values():
            for name, module in inner.named_modules():
                try:  # the `mlp` control's inner modules have no counterpart in the attention
                    ref = attention.get_submodule(name) if name else None
                except AttributeError:
                    ref = None
                if ref is not None and is_patched(ref) and not is_patched(module):
                    _copy_patch(ref, module)
                    count += 1
    return count


def _copy_patch(ref: nn.Module, module: nn.Module) -> None:
    own = vars(module)
    for key, value in list(vars(ref).items()):
        if isinstance(value, MethodType) and value.__self__ is ref:
            own[key] = MethodType(value.__func__, module)
        elif key not in own:  # settings Liger added; the module's own (its eps, nn.Module state) stay
            own[key] = value
