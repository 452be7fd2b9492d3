"""LoRA for small budgets: adapters on the outer projections, the Nexus parameters trained in full.

`use_peft: true` in a recipe builds TRL's LoraConfig from the `lora_*` keys (`trl.get_peft_config`, as
open-r1 does) and adapts it to a Nexus model:

- LoRA goes on the outer attention projections (q/k/v/o of each layer's `self_attn`; GPT-NeoX's `query_key_value` and `dense`) unless
  `lora_target_modules` says otherwise; the inner attention modules are never LoRA targets.
- The inner attention modules train in full through PEFT's `modules_to_save` (`self_attn.inner.q`, ...:
  PEFT refuses to wrap the ModuleDict itself, but its values are ordinary attention modules).
- The gates are a ParameterDict, which `modules_to_save` refuses too (PEFT 0.21: "modules_to_save cannot
  be applied to modules of type ParameterDict"), so they are marked trainable after PEFT froze the base
  model, and written beside the adapter in every checkpoint (GATES_FILE), so a resumed run gets them back.
- At the end the adapters are merged (`merge_and_unload`): the run folder holds an ordinary Nexus
  checkpoint, loadable with `AutoModelForCausalLM.from_pretrained`, and no adapter files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..modeling.names import INNER_PATTERN, is_gate, split_inner
from .errors import RecipeError

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments
    from trl import ModelConfig

logger = logging.getLogger(__name__)

OUTER_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
OUTER_ATTENTION_FUSED = ("query_key_value", "dense")  # GPT-NeoX: one fused q/k/v, `dense` as o_proj
GATES_FILE = "nexus_gates.safetensors"


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def inner_module_suffixes(model: nn.Module) -> list[str]:
    """`self_attn.inner.<p>` (GPT-NeoX `attention.inner.<p>`) for every inner attention module: PEFT
    matches modules_to_save by suffix."""
    found = (split_inner(name) for name, _ in model.named_modules())
    return sorted({head + rest for head, rest in filter(None, found) if "." not in rest})


def outer_attention_targets(model: nn.Module) -> set[str]:
    """The outer attention projections, by the names the family gives them."""
    fused = any(name.endswith(".query_key_value") for name, _ in model.named_modules())
    return set(OUTER_ATTENTION_FUSED if fused else OUTER_ATTENTION)


def _check_lora_values(model_args: ModelConfig) -> None:
    """LoraConfig takes r 0 or a dropout of 2 without a word; the first forward pass would not."""
    r, alpha, dropout = model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RecipeError(f"lora_r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise RecipeError(f"lora_alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise RecipeError(f"lora_dropout must be in [0, 1), got {dropout!r}")


def base_lora_config(model_args: ModelConfig) -> LoraConfig | None:
    """TRL's LoraConfig from the recipe's `lora_*` keys (None without use_peft); RecipeError if invalid."""
    from trl import get_peft_config

    if not model_args.use_peft:
        return None
    _check_lora_values(model_args)
    try:
        return get_peft_config(model_args)
    except (ValueError, TypeError) as e:  # PEFT missing, or a LoraConfig value it rejects
        raise RecipeError(f"use_peft: {e}") from None


def lora_config(model_args: ModelConfig, model: nn.Module) -> LoraConfig | None:
    """The LoraConfig for `model`: outer projections by default, inner modules trained in full."""
    config = base_lora_config(model_args)
    if config is None:
        return None
    targets = config.target_modules
    if not targets:  # PEFT's own default looks the model type up, and nexus_* types are not in its table
        config.target_modules = outer_attention_targets(model)
    elif targets == {"all-linear"}:  # TRL passes a list; PEFT expands the shorthand only as a string
        config.target_modules = "all-linear"
    inner = inner_module_suffixes(model)
    if inner:
        # the inner modules train in full: a LoRA on them would be a second, redundant copy
        config.exclude_modules = INNER_PATTERN
        config.modules_to_save = [*(config.modules_to_save or []), *inner]
    return config


def check_peft_engine(training: TrainingArguments, use_peft: bool) -> None:
    """Merging the adapters at the end needs every weight whole on every process: not under FSDP/ZeRO-3."""
    if not use_peft:
        return
    fsdp = bool(training.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    plugin = getattr(training, "deepspeed_plugin", None)
    if fsdp or (plugin is not None and plugin.zero_stage == 3):
        raise RecipeError(
            "use_peft is not supported under FSDP or DeepSpeed ZeRO-3 (the final merge needs whole weights): "
            "use DDP or ZeRO-2, which LoRA's small optimizer state suits anyway"
        )


def unfreeze_gates(model: nn.Module) -> int:
    """Mark the gates trainable (PEFT froze them with the base model); the number of gate tensors."""
    gates = [p for name, p in model.named_parameters() if is_gate(name)]
    for param in gates:
        param.requires_grad_(True)
    return len(gates)


def _gates(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gates by their name in the base model (as in a merged checkpoint)."""
    base = model.get_base_model() if is_peft_model(model) else model
    return {name: p for name, p in base.named_parameters() if is_gate(name)}


def save_gates(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write the gates beside a PEFT checkpoint's adapter (its adapter file leaves them out)."""
    from safetensors.torch import save_file

    gates = {name: p.detach().cpu().contiguous() for name, p in _gates(model).items()}
    if gates:
        save_file(gates, str(Path(folder) / GATES_FILE), metadata={"format": "pt"})


def load_gates(model: nn.Module, folder: str | os.PathLike) -> None:
    """Restore the gates a PEFT checkpoint holds (resume); a checkpoint without them is refused."""
    from safetensors.torch import load_file

    gates = _gates(model)
    if not gates:
        return
    path = Path(folder) / GATES_FILE
    if not path.is_file():
        raise RecipeError(f"{folder} has no {GATES_FILE}: its gates were not saved, so it cannot be resumed")
    saved = load_file(str(path))
    missing = sorted(set(gates) - set(saved))
    if missing:
        raise RecipeError(f"{path} lacks gate(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, param in gates.items():
            param.copy_(saved[name].to(param.device, param.dtype))


def merge_adapters(trainer: Trainer) -> None:
    """Fold the adapters into the weights, so save_model writes an ordinary (Nexus) checkpoint."""
    if not is_peft_model(trainer.model):
        return
    merged = trainer.model.merge_and_unload()
    trainer.model = merged
    trainer.model_wrapped = merged
    logger.info("use_peft: merged the LoRA adapters into the model before saving")
