"""The supported model families: one table.

Each row maps a base checkpoint's `model_type` to the stem of its Nexus class names
(`Nexus{stem}Config`, `Nexus{stem}ForCausalLM`, `Nexus{stem}Model`). The Auto registrations
(`nexus_retrofit.modeling`), the vLLM registrations (`nexus_retrofit.vllm`), `convert`'s check of a
source and the tests' family matrix are made from it. Adding a family is one row here plus what is
truly new: its config and model classes in the bundled files (modeling/configuration_nexus.py,
modeling/modeling_nexus.py, which cannot import this package) and, for vLLM, its decoder layer.
Imports nothing: the vLLM plugin's entry point reads it without importing torch.
"""

from __future__ import annotations

FAMILIES: dict[str, str] = {
    "qwen2": "Qwen2",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen3": "Qwen3",
    "gpt_neox": "GPTNeoX",  # Pythia
}


def class_names(model_type: str) -> tuple[str, str, str]:
    """(config, causal LM, base model) class names of the Nexus version of `model_type`."""
    stem = FAMILIES[model_type]
    return f"Nexus{stem}Config", f"Nexus{stem}ForCausalLM", f"Nexus{stem}Model"


__all__ = ["FAMILIES", "class_names"]
