"""The plugin's guard: what a Nexus checkpoint must satisfy to be served by vLLM, on every release.

Kept apart from `models.py`, and free of vLLM and torch imports, so that the tests can check it in an
environment without vLLM, against the sources of every supported vLLM release: the Nexus Qwen decoder
layer does not call vLLM's constructor, so each check that constructor makes must be made here
(tests/vllm/test_vllm_layers.py lists them, and fails naming one this guard lacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling.configuration_nexus import NexusConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def check_nexus_config(config: PretrainedConfig) -> NexusConfig:
    """The checkpoint's Nexus settings, or an error naming what vLLM cannot serve."""
    if getattr(config, "nexus", None) is None:
        raise ValueError(
            f"{type(config).__name__} has no `nexus` block: not a Nexus checkpoint (convert one with "
            "`nexus-retrofit convert`)"
        )
    # vLLM's decoder layers build an encoder-only attention for is_causal=False; the Nexus one is causal
    if not getattr(config, "is_causal", True):
        raise NotImplementedError("Nexus models are causal decoders; is_causal=False is not supported")
    check_one_window(config)
    nexus = NexusConfig.from_dict(config.nexus)
    if nexus.inner == "mlp":
        raise NotImplementedError(
            "inner='mlp' is the experiments' token-wise control, not served by vLLM: use `--backend hf`"
        )
    return nexus


def check_one_window(config: PretrainedConfig) -> None:
    """Refuse a sliding window on some layers but not all, on every vLLM release.

    vLLM checks it itself, in `Qwen2Model.__init__` up to 0.33 and in `Qwen2DecoderLayer.__init__`
    from 0.34, whose constructor the Nexus layer does not call (see `_NexusQwenDecoderLayer`): without
    this check such a checkpoint would be served with one window for every layer, wrong output and no
    error. vLLM lets a mixed layout through when `max_window_layers == num_hidden_layers`; this guard
    refuses every mixed layout (stricter). The Nexus attention gives every sub-attention its layer's
    window, so a uniform layout is fine.
    """
    layer_types = list(getattr(config, "layer_types", None) or [])
    if len(set(layer_types)) > 1:
        counts = {kind: layer_types.count(kind) for kind in dict.fromkeys(layer_types)}
        raise NotImplementedError(
            f"sliding window on some layers but not all ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
            "is not supported by vLLM for this architecture; serve it with transformers (`--backend hf`)"
        )


__all__ = ["check_nexus_config", "check_one_window"]
