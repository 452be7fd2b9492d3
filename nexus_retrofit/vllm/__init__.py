"""vLLM plugin: serve and evaluate Nexus checkpoints with vLLM (`vllm serve CHECKPOINT`, `vllm.LLM`).

Installed as the `vllm.general_plugins` entry point `nexus_retrofit = "nexus_retrofit.vllm:register"`:
vLLM calls `register()` in every process it starts (API server, engine core, workers), so the
architectures are known wherever a model is built. Registration is lazy ("module:Class" strings:
nothing of vLLM's model code is imported until a Nexus model is loaded) and idempotent.

Importing this package imports neither vLLM nor torch; `register()` imports vLLM's registry and
`nexus_retrofit.modeling`, which registers the Nexus config classes with transformers' AutoConfig
(vLLM reads `config.json` through AutoConfig, and must not need `trust_remote_code` for it).
"""

from __future__ import annotations

_MODELS = "nexus_retrofit.vllm.models"

# architecture in config.json -> "module:Class" of its vLLM implementation
ARCHITECTURES: dict[str, str] = {
    f"Nexus{family}ForCausalLM": f"{_MODELS}:Nexus{family}ForCausalLM"
    for family in ("Qwen2", "Llama", "Mistral", "Qwen3")
}


def register() -> None:
    """Register every Nexus architecture with vLLM's ModelRegistry (idempotent, any process)."""
    from vllm import ModelRegistry

    from .. import modeling  # noqa: F401  (AutoConfig.register of the nexus_* model types)

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = ["ARCHITECTURES", "register"]
