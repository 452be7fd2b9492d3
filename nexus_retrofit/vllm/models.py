"""vLLM model classes for Nexus checkpoints: vLLM's Qwen2 / Qwen3 / Llama models, Nexus attention.

GPT-NeoX (Pythia) has no native vLLM model in the tested releases (vLLM serves the stock one through its
Transformers backend), so `NexusGPTNeoXForCausalLM` is built here from vLLM's parallel layers: the
embedding, LayerNorms, GELU MLP, LM head, and the Nexus attention of Llama (vLLM's LlamaAttention takes
GPT-NeoX's biases and, from `rope_parameters`, its partial rotary). The checkpoint's fused per-head
`query_key_value` is split into vLLM's stacked q/k/v on loading.

Everything but the attention is vLLM's own: `Qwen2Model` / `LlamaModel` (embedding, layer stack,
final norm, tensor-parallel linears, torch.compile), the MLPs, norms, LM head and weight loading
(HF names; q/k/v and gate/up stacked by vLLM's mapper, Nexus inner modules and gates by name).

The causal-LM classes do not subclass vLLM's `Qwen2ForCausalLM` / `LlamaForCausalLM`: those declare
LoRA, pipeline-parallel and EAGLE support, which is not tested for Nexus models. What these classes
support: tensor parallelism (vLLM's parallel linears; `self` gates are sharded like the heads),
every Nexus setting of the converter, prefix caching and chunked prefill (every sub-attention is an
ordinary causal vLLM `Attention` with its own paged cache).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import set_default_rope_theta

from .attention import NexusLlamaAttention, NexusQwen2Attention, NexusQwen3Attention
from .checks import check_nexus_config as _check_nexus_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# ------------------------------------------------------------------------------ decoder layers
class _NexusQwenDecoderLayer:
    """vLLM's Qwen2/Qwen3 decoder layer with a Nexus attention; `forward` is vLLM's, inherited.

    vLLM's `__init__` is not called: it takes no attention class (Llama's does: `attn_layer_type`),
    and the stock attention it builds registers this layer's name ("Duplicate layer name" when the
    Nexus one registers it again). This `__init__` builds the same modules as vLLM's, with the family's
    `attention_class` in place of the stock one; tests/vllm/test_vllm_layers.py reads both constructors
    and fails, naming the module, when a vLLM release changes what its constructor builds.
    """

    attention_class: type[nn.Module]

    def __init__(
        self,
        config: PretrainedConfig,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        nn.Module.__init__(self)
        _check_nexus_config(config)
        self.hidden_size = config.hidden_size
        set_default_rope_theta(config, default_theta=1000000)
        self.self_attn = self.attention_class(
            nexus=config.nexus,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            rms_norm_eps=config.rms_norm_eps,
            cache_config=cache_config,
            quant_config=quant_config,
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None),
            prefix=f"{prefix}.self_attn",
            **self._family_attention_kwargs(config),
        )
        self.mlp = Qwen2MLP(
            hidden_size=self.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @staticmethod
    def _family_attention_kwargs(config: PretrainedConfig) -> dict:
        """What the family's vLLM constructor passes its attention beyond the shared settings."""
        raise NotImplementedError


class NexusQwen2DecoderLayer(_NexusQwenDecoderLayer, Qwen2DecoderLayer):
    attention_class = NexusQwen2Attention

    @staticmethod
    def _family_attention_kwargs(config: PretrainedConfig) -> dict:
        return {"qk_norm": getattr(config, "qk_norm", False)}


class NexusQwen3DecoderLayer(_NexusQwenDecoderLayer, Qwen3DecoderLayer):
    attention_class = NexusQwen3Attention

    @staticmethod
    def _family_attention_kwargs(config: PretrainedConfig) -> dict:
        return {
            "head_dim": getattr(config, "head_dim", None),
            "qkv_bias": getattr(config, "attention_bias", False),
        }


class NexusLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer; it takes the attention class as an argument."""

    def __init__(
        self, vllm_config: VllmConfig, prefix: str = "", config: PretrainedConfig | None = None
    ) -> None:
        _check_nexus_config(config or vllm_config.model_config.hf_config)
        super().__init__(
            vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=NexusLlamaAttention
        )


# ---------------------------------------------------------------------------------- causal LMs
class _NexusForCausalLM(nn.Module):
    """Causal LM over a vLLM base model built with Nexus decoder layers (cf. vLLM's Qwen2ForCausalLM)."""

    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper  # q/k/v -> qkv_proj, gate/up -> gate_up_proj
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.get_text_config()
        self.nexus = _check_nexus_config(config)
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = self._init_model(vllm_config, maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=self.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def _init_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # `model` has its own load_weights (vLLM's, with the stacking mapper); the rest loads by name.
        return AutoWeightsLoader(self).load_weights(weights)


class NexusQwen2ForCausalLM(_NexusForCausalLM):
    def _init_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen2Model(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=NexusQwen2DecoderLayer)


class NexusQwen3ForCausalLM(_NexusForCausalLM):
    def _init_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        # vLLM's Qwen3Model is Qwen2Model with Qwen3 decoder layers
        return Qwen2Model(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=NexusQwen3DecoderLayer)


class NexusLlamaForCausalLM(_NexusForCausalLM):
    def _init_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return LlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=NexusLlamaDecoderLayer)


class NexusMistralForCausalLM(NexusLlamaForCausalLM):
    """HF-format Mistral is Llama's layout (vLLM runs it with Llama layers); sliding window from the config."""


# ------------------------------------------------------------------------------------- GPT-NeoX
class _GPTNeoXMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden, inner, bias=True, quant_config=quant_config, prefix=f"{prefix}.dense_h_to_4h"
        )
        self.dense_4h_to_h = RowParallelLinear(
            inner, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.dense_4h_to_h"
        )
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)[0]))[0]


class NexusGPTNeoXLayer(nn.Module):
    """GPT-NeoX's decoder layer (LayerNorms, parallel or sequential residual) with a Nexus attention."""

    def __init__(
        self,
        config: PretrainedConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        _check_nexus_config(config)
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = NexusLlamaAttention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_attention_heads,  # no GQA
            max_position_embeddings=config.max_position_embeddings,
            quant_config=quant_config,
            bias=config.attention_bias,
            bias_o_proj=config.attention_bias,
            cache_config=cache_config,
            prefix=f"{prefix}.attention",
        )
        self.mlp = _GPTNeoXMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attention = self.attention(positions, self.input_layernorm(hidden_states))
        if self.use_parallel_residual:  # x + Attn(LN1(x)) + MLP(LN2(x))
            return self.mlp(self.post_attention_layernorm(hidden_states)) + attention + hidden_states
        hidden_states = attention + hidden_states  # h = x + Attn(LN1(x)); h + MLP(LN2(h))
        return self.mlp(self.post_attention_layernorm(hidden_states)) + hidden_states


# as vLLM's own models (Qwen2Model's dims): compiled unless enforce_eager, the token count dynamic
@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class _NexusGPTNeoXModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.get_text_config()
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_in = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_in"
        )
        self.layers = nn.ModuleList(
            NexusGPTNeoXLayer(config, cache_config, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_in(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.final_layer_norm(hidden_states)


# HF names of an attention's output projection: the layer's `attention.dense`, an inner module's `dense`
_GPT_NEOX_DENSE = re.compile(r"\.(attention|inner\.[qkv])\.dense\.")
_GPT_NEOX_IGNORED = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")  # old buffers


class NexusGPTNeoXForCausalLM(nn.Module):
    """Causal LM over the GPT-NeoX layers above; HF names (`gpt_neox.*`, Pythia's `embed_out`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.get_text_config()
        self.nexus = _check_nexus_config(config)
        self.config = config
        self.gpt_neox = _NexusGPTNeoXModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "gpt_neox"))
        self.embed_out = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "embed_out"),
        )
        if config.tie_word_embeddings:
            self.embed_out = self.embed_out.tie_weights(self.gpt_neox.embed_in)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.embed_out, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF GPT-NeoX names onto vLLM's modules: `query_key_value` (each head's [q k v] rows together)
        is split into q, k and v for the stacked `qkv_proj`; `dense` of an attention is its `o_proj`."""
        params = dict(self.named_parameters())
        heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // heads
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_GPT_NEOX_IGNORED):
                continue
            if name == "embed_out.weight" and self.config.tie_word_embeddings:
                continue  # the embedding, loaded under its own name
            if ".query_key_value." in name:
                target = name.replace(".query_key_value.", ".qkv_proj.")
                param = params[target]
                per_head = tensor.view(heads, 3, head_dim, *tensor.shape[1:])
                for i, shard in enumerate("qkv"):
                    param.weight_loader(
                        param, per_head[:, i].reshape(heads * head_dim, *tensor.shape[1:]), shard
                    )
            else:
                target = _GPT_NEOX_DENSE.sub(lambda m: f".{m.group(1)}.o_proj.", name)
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


__all__ = [
    "NexusGPTNeoXForCausalLM",
    "NexusGPTNeoXLayer",
    "NexusLlamaDecoderLayer",
    "NexusLlamaForCausalLM",
    "NexusMistralForCausalLM",
    "NexusQwen2DecoderLayer",
    "NexusQwen2ForCausalLM",
    "NexusQwen3DecoderLayer",
    "NexusQwen3ForCausalLM",
]
