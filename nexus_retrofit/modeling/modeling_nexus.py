"""Nexus higher-order attention (arXiv 2512.03377) for Qwen2, Llama, Mistral and Qwen3.

Subclass, don't fork: each Nexus model is the transformers model with its attention modules
replaced by a Nexus attention that subclasses the family's own attention class. RoPE, masks,
generation, gradient checkpointing and attention dispatch (eager / sdpa / flash) stay upstream's.

This file is copied into every converted checkpoint (`auto_map`): it imports only torch,
transformers and its sibling configuration_nexus.py.

Notation (DESIGN.md section 1): X is the layer input after the input norm, P the refined
projections, m the order. Level l = 1 .. m-1 computes the inner attentions; the outer (level m)
attention is the layer's own, fed with the refined inputs of level m-1:

    X_p^(0) = X
    X_p^(l) = X + g_p * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))     (Eq. 10-11, gated residual)
    O       = Attn(X_q^(m-1), X_k^(m-1), X_v^(m-1))

All inner attentions of one level see the same inputs, so the paper's 2^m - 1 calls (Eq. 13)
collapse to 1 + |P|(m-1) distinct calls; the |P| calls of one level are fused into a single kernel
call by stacking their heads, and each level owns one KV-cache slot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import eager_attention_forward as _eager_attention_forward
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralForCausalLM, MistralModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM, Qwen3Model

from .configuration_nexus import (
    NexusConfig,
    NexusLlamaConfig,
    NexusMistralConfig,
    NexusQwen2Config,
    NexusQwen3Config,
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, n, d) with cos/sin of shape (B, n, d); same arithmetic as transformers'."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


class _KernelView:
    """What an attention kernel reads from its `module` argument, for a fused inner call.

    Kernels read num_key_value_groups, is_causal, training, config and layer_idx; a fused call
    over stacked heads needs its own group count and cache index, the rest is the layer's.
    """

    def __init__(self, module: nn.Module, num_key_value_groups: int, layer_idx: int):
        self._module = module
        self.num_key_value_groups = num_key_value_groups
        self.layer_idx = layer_idx
        self.is_causal = True

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class NexusAttentionMixin:
    """Nexus attention; mixed in front of a transformers attention class (Qwen2Attention, ...)."""

    base_attention_class: type[nn.Module]

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        nexus = NexusConfig.from_dict(config.nexus)
        self.nexus = nexus
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if nexus.inner == "separate" and nexus.levels > 0:
            # Sec. 4.4: one full attention module per refined projection, same head layout and RoPE.
            self.inner = nn.ModuleDict(
                {p: self.base_attention_class(config, layer_idx) for p in nexus.projections}
            )
        if nexus.gate == "zero" and nexus.levels > 0:
            self.gates = nn.ParameterDict(
                {p: nn.Parameter(torch.zeros(self._gate_width(p))) for p in nexus.projections}
            )

    # ----------------------------------------------------------------------------------- helpers
    def _heads(self, p: str) -> int:
        return self.num_heads if p == "q" else self.num_kv_heads

    def _gate_width(self, p: str) -> int:
        # separate/shared refine the layer input (hidden size); self refines one projection's heads.
        return self._heads(p) * self.head_dim if self.nexus.inner == "self" else self.config.hidden_size

    def _sliding_window(self) -> int | None:
        if hasattr(self, "sliding_window"):
            return self.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral reads it from the config

    def _attention_interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, _eager_attention_forward
        )

    def _cache_slot(self, level: int) -> int:
        """Cache index of inner level `level` (1-based): after the real layers, one slot per level."""
        return self.config.num_hidden_layers + self.layer_idx * self.nexus.levels + (level - 1)

    def _cache_update(self, cache: Cache, key: torch.Tensor, value: torch.Tensor, slot: int):
        """`cache.update` for an inner slot, first appending empty layers like the layer's own."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise NotImplementedError(
                f"Nexus attention needs a layered transformers Cache, got {type(cache).__name__}"
            )
        while len(layers) <= slot:
            own = layers[self.layer_idx] if self.layer_idx < len(layers) else DynamicLayer()
            if isinstance(own, DynamicSlidingWindowLayer):
                layers.append(DynamicSlidingWindowLayer(sliding_window=own.sliding_window))
            elif type(own) is DynamicLayer:
                layers.append(DynamicLayer())
            else:
                raise NotImplementedError(
                    f"Nexus attention supports DynamicCache only, not {type(own).__name__} (e.g. a static cache): "
                    "generate with cache_implementation='dynamic' (the default)."
                )
        return cache.update(key, value, slot)

    @staticmethod
    def _project(module: nn.Module, xq, xk, xv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V heads (B, h, n, d) of an attention module on (possibly refined) inputs, pre-RoPE."""
        shape = (*xq.shape[:-1], -1, module.head_dim)
        q = module.q_proj(xq).view(shape)
        k = module.k_proj(xk).view(shape)
        if hasattr(module, "q_norm"):  # Qwen3: RMSNorm on each head before RoPE
            q, k = module.q_norm(q), module.k_norm(k)
        v = module.v_proj(xv).view(shape)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, q, k, v, attention_mask, past_key_values, slot: int, groups: int, **kwargs):
        """One attention kernel call through transformers' dispatch; returns (B, n, heads, d)."""
        if past_key_values is not None:
            if slot == self.layer_idx:
                k, v = past_key_values.update(k, v, slot)
            else:
                k, v = self._cache_update(past_key_values, k, v, slot)
        module = self if slot == self.layer_idx else _KernelView(self, groups, slot)
        out, weights = self._attention_interface()(
            module,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self._sliding_window(),
            **kwargs,
        )
        return out, weights

    def _gated(self, base: torch.Tensor, inner_out: torch.Tensor, p: str) -> torch.Tensor:
        if self.nexus.gate == "none":
            return inner_out  # the paper's form: X_p = Inner_p(X)
        gate = self.gates[p]
        if self.nexus.inner == "self":
            gate = gate.view(self._heads(p), 1, self.head_dim)  # per head and dimension
        return base + gate * inner_out  # X_p = X + g_p * Inner_p(X)

    # ------------------------------------------------------------------------- inner attention
    def _refine_inputs(self, x, inputs, level, cos, sin, attention_mask, past_key_values, **kwargs):
        """One level of `separate`/`shared`: new refined inputs {p: X_p^(level)} from inputs^(level-1)."""
        xq, xk, xv = inputs["q"], inputs["k"], inputs["v"]
        if self.nexus.inner == "shared":
            modules = [self]  # Eq. 12: the layer's own attention; one pass serves every projection
        else:
            modules = [self.inner[p] for p in self.nexus.projections]
        qs, ks, vs = zip(*(self._project(m, xq, xk, xv) for m in modules))
        # Fuse the |P| independent attentions of this level by stacking heads: with the same GQA
        # grouping inside each block, head i of block b still reads KV head b*Hkv + i // groups.
        q = _rope(torch.cat(qs, dim=1), cos, sin)
        k = _rope(torch.cat(ks, dim=1), cos, sin)
        v = torch.cat(vs, dim=1)
        out, _ = self._attend(
            q,
            k,
            v,
            attention_mask,
            past_key_values,
            self._cache_slot(level),
            self.num_key_value_groups,
            **kwargs,
        )
        outs = out.chunk(len(modules), dim=2)  # (B, n, H, d) per module
        ys = [m.o_proj(o.reshape(*x.shape[:-1], -1)) for m, o in zip(modules, outs)]
        if self.nexus.inner == "shared":
            ys = ys * len(self.nexus.projections)
        refined = dict(inputs)
        for p, y in zip(self.nexus.projections, ys):
            refined[p] = self._gated(x, y, p)
        return refined

    def _refine_heads(self, base, heads, level, cos, sin, attention_mask, past_key_values, **kwargs):
        """One level of `self` (Eq. 7-8): P' = softmax(R(P) R(P)^T s + M) P per head, then gated."""
        ps = self.nexus.projections
        z = torch.cat([heads[p] for p in ps], dim=1)  # (B, H + Hkv [+ Hkv], n, d)
        rz = _rope(z, cos, sin)
        out, _ = self._attend(
            rz, rz, z, attention_mask, past_key_values, self._cache_slot(level), 1, **kwargs
        )
        out = out.transpose(1, 2)  # (B, heads, n, d)
        refined = dict(heads)
        for p, o in zip(ps, out.split([self._heads(p) for p in ps], dim=1)):
            refined[p] = self._gated(base[p], o, p)
        return refined

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = hidden_states  # (B, n, hidden)
        cos, sin = position_embeddings
        levels = range(1, self.nexus.order)
        if self.nexus.inner == "self":
            q, k, v = self._project(self, x, x, x)
            base = {"q": q, "k": k, "v": v}
            heads = base
            for level in levels:
                heads = self._refine_heads(
                    base, heads, level, cos, sin, attention_mask, past_key_values, **kwargs
                )
            q, k, v = heads["q"], heads["k"], heads["v"]
        else:
            inputs = {"q": x, "k": x, "v": x}
            for level in levels:
                inputs = self._refine_inputs(
                    x, inputs, level, cos, sin, attention_mask, past_key_values, **kwargs
                )
            q, k, v = self._project(self, inputs["q"], inputs["k"], inputs["v"])
        # Outer attention: exactly the base layer's computation on the refined Q/K/V.
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out, weights = self._attend(
            q, k, v, attention_mask, past_key_values, self.layer_idx, self.num_key_value_groups, **kwargs
        )
        out = out.reshape(*x.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


class NexusQwen2Attention(NexusAttentionMixin, Qwen2Attention):
    base_attention_class = Qwen2Attention


class NexusLlamaAttention(NexusAttentionMixin, LlamaAttention):
    base_attention_class = LlamaAttention


class NexusMistralAttention(NexusAttentionMixin, MistralAttention):
    base_attention_class = MistralAttention


class NexusQwen3Attention(NexusAttentionMixin, Qwen3Attention):
    base_attention_class = Qwen3Attention


# ----------------------------------------------------------------------------------- models
def _install_nexus_attention(layers: nn.ModuleList, config, attention_class: type[nn.Module]) -> None:
    for i, layer in enumerate(layers):
        layer.self_attn = attention_class(config, i)


class _NexusPreTrainedMixin:
    """Zero-initialises the gates (function-preserving retrofit) on top of the family's init."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NexusAttentionMixin) and hasattr(module, "gates"):
            for gate in module.gates.values():
                init.zeros_(gate)


class NexusQwen2Model(_NexusPreTrainedMixin, Qwen2Model):
    config_class = NexusQwen2Config

    def __init__(self, config: NexusQwen2Config):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusQwen2Attention)
        self.post_init()


class NexusQwen2ForCausalLM(_NexusPreTrainedMixin, Qwen2ForCausalLM):
    config_class = NexusQwen2Config

    def __init__(self, config: NexusQwen2Config):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusQwen2Attention)
        self.post_init()


class NexusLlamaModel(_NexusPreTrainedMixin, LlamaModel):
    config_class = NexusLlamaConfig

    def __init__(self, config: NexusLlamaConfig):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusLlamaAttention)
        self.post_init()


class NexusLlamaForCausalLM(_NexusPreTrainedMixin, LlamaForCausalLM):
    config_class = NexusLlamaConfig

    def __init__(self, config: NexusLlamaConfig):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusLlamaAttention)
        self.post_init()


class NexusMistralModel(_NexusPreTrainedMixin, MistralModel):
    config_class = NexusMistralConfig

    def __init__(self, config: NexusMistralConfig):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusMistralAttention)
        self.post_init()


class NexusMistralForCausalLM(_NexusPreTrainedMixin, MistralForCausalLM):
    config_class = NexusMistralConfig

    def __init__(self, config: NexusMistralConfig):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusMistralAttention)
        self.post_init()


class NexusQwen3Model(_NexusPreTrainedMixin, Qwen3Model):
    config_class = NexusQwen3Config

    def __init__(self, config: NexusQwen3Config):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusQwen3Attention)
        self.post_init()


class NexusQwen3ForCausalLM(_NexusPreTrainedMixin, Qwen3ForCausalLM):
    config_class = NexusQwen3Config

    def __init__(self, config: NexusQwen3Config):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusQwen3Attention)
        self.post_init()


# save_pretrained copies this file (and configuration_nexus.py, which it imports) next to the weights.
for _cls in (NexusQwen2ForCausalLM, NexusLlamaForCausalLM, NexusMistralForCausalLM, NexusQwen3ForCausalLM):
    _cls.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "NexusAttentionMixin",
    "NexusQwen2Model",
    "NexusQwen2ForCausalLM",
    "NexusLlamaModel",
    "NexusLlamaForCausalLM",
    "NexusMistralModel",
    "NexusMistralForCausalLM",
    "NexusQwen3Model",
    "NexusQwen3ForCausalLM",
]
