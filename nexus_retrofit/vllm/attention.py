"""Nexus higher-order attention (arXiv 2512.03377) built from vLLM parts.

Subclass, don't fork: `NexusQwen2Attention`, `NexusQwen3Attention` and `NexusLlamaAttention` are
vLLM's own attention classes (their `qkv_proj`, `o_proj`, rotary embedding, Qwen3's q/k norms and
their `attn`, which becomes the outer attention) with the Nexus levels added in front. The maths is
not written here: the level loops, the gate and what each reading decides (gate widths, which
sub-attentions exist, one pass or one per projection) are `nexus_retrofit/modeling/nexus_core.py`,
the same code the transformers model runs; this file supplies vLLM's projections and attention layers
(docs/DESIGN.md §1):

    X_p^(0) = X
    X_p^(l) = X + g_p * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))     l = 1 .. m-1 (Eq. 10-11)
    O       = Attn(X_q^(m-1), X_k^(m-1), X_v^(m-1))                  the layer's own attention

(`self`: the same recursion on the pre-RoPE Q/K/V heads, Eq. 7-8; `gate="none"`: X_p = Inner_p).

Every distinct sub-attention (`Reading.sub_attentions`) is its own vLLM `Attention` with its own
paged KV cache: one per (level, refined projection) for `separate` and `self`, one per level for
`shared` (its one inner pass serves every projection). Layer names hold exactly one integer, the layer index, e.g.
`model.layers.3.self_attn.inner_attn.k_level1` (vLLM's `extract_layer_index` requires it).

Tensors are vLLM's flat token layout: (T, heads * head_dim) for T tokens of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2Attention
from vllm.model_executor.models.qwen3 import Qwen3Attention
from vllm.v1.attention.backend import AttentionType

from ..modeling.configuration_nexus import NexusConfig
from ..modeling.nexus_core import Dims, GateSpec, inner_outputs, reading, refine_heads, refine_inputs

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class NexusInnerProjections(nn.Module):
    """The weights of one `separate` inner attention module (Sec. 4.4): q/k/v/o like the layer's own.

    Checkpoint names are the HF ones, `self_attn.inner.{p}.{q,k,v,o}_proj`; vLLM's weight mapper
    stacks q/k/v into `qkv_proj` as it does for the layer's own projections.
    """

    def __init__(self, outer: nn.Module, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = outer.head_dim
        self.q_size, self.kv_size = outer.q_size, outer.kv_size
        self.qkv_proj = QKVParallelLinear(
            outer.hidden_size,
            outer.head_dim,
            outer.total_num_heads,
            outer.total_num_kv_heads,
            bias=outer.qkv_proj.bias is not None,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            outer.total_num_heads * outer.head_dim,
            outer.hidden_size,
            bias=outer.o_proj.bias is not None,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        if _has_qk_norm(outer):  # Qwen3: RMSNorm on every head before RoPE
            self.q_norm = RMSNorm(outer.head_dim, eps=outer.q_norm.variance_epsilon)
            self.k_norm = RMSNorm(outer.head_dim, eps=outer.k_norm.variance_epsilon)


def _has_qk_norm(module: nn.Module) -> bool:
    return getattr(module, "q_norm", None) is not None


class NexusVllmAttentionMixin:
    """Nexus levels in front of a vLLM attention class (Qwen2Attention, Qwen3Attention, LlamaAttention).

    The vLLM class builds `qkv_proj`, `o_proj`, `rotary_emb` (and Qwen3's `q_norm`/`k_norm`) and
    `attn`, the outer attention; `_init_nexus` adds the inner modules, gates and inner `Attention`s.
    """

    def _init_nexus(
        self,
        nexus: NexusConfig | dict[str, Any] | None,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        self.nexus = nexus if isinstance(nexus, NexusConfig) else NexusConfig.from_dict(nexus)
        if self.attn.attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"Nexus attention is causal (decoder) only, not {self.attn.attn_type}")
        self.qk_norm = _has_qk_norm(self)
        self.reading = reading(self.nexus.inner)
        self.gate_spec = GateSpec(self.nexus.gate, self.nexus.gate_shape, self.nexus.gate_fn)
        # this rank's head counts (q: query heads; k, v: KV heads); gates of hidden size are replicated
        self.dims = Dims(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim)
        nexus = self.nexus
        if self.reading.inner_modules and nexus.levels > 0:
            self.inner = nn.ModuleDict(
                {
                    p: NexusInnerProjections(self, quant_config, f"{prefix}.inner.{p}")
                    for p in nexus.projections
                }
            )
        if self.gate_spec.gated and nexus.levels > 0:  # "zero" or "open": the gated residual
            self.gates = nn.ParameterDict({p: self._make_gate(p) for p in nexus.projections})
        self.inner_attn = nn.ModuleDict(
            {
                sub.name: Attention(
                    self.dims.of(sub.heads[0]),
                    self.head_dim,
                    self.scaling,
                    num_kv_heads=self.dims.of(sub.heads[1]),
                    cache_config=cache_config,
                    quant_config=quant_config,
                    per_layer_sliding_window=self.attn.sliding_window,
                    prefix=f"{prefix}.inner_attn.{sub.name}",
                )
                for sub in self.reading.sub_attentions(nexus.projections, nexus.order)
            }
        )

    # ------------------------------------------------------------------------------------ gates
    def _make_gate(self, p: str) -> nn.Parameter:
        """Gate g_p as the HF model shapes it (NexusConfig.gate_shape), this rank's part of it.

        scalar: one value (replicated). channel: the hidden size for separate/shared (replicated), the
        projection's heads x head_dim for self (sharded like those heads). head: one value per inner
        head, sharded like the heads it scales (query heads for separate/shared, p's heads for self).
        """
        width = self.reading.gate_width(p, self.gate_spec, self.dims)  # this rank's part
        gate = nn.Parameter(torch.zeros(width), requires_grad=False)
        shape = self.gate_spec.shape
        if shape == "head" or (
            shape == "channel" and self.reading.on_heads
        ):  # per head: sharded like its heads
            heads_of = p if self.reading.on_heads else "q"
            gate.weight_loader = self._gate_loader(p, heads_of)  # shard like qkv_proj shards the heads
        return gate

    def _gate_loader(self, p: str, heads_of: str) -> Callable[[nn.Parameter, torch.Tensor], None]:
        qkv = self.qkv_proj
        if heads_of == "q":
            rank = qkv.tp_rank
        else:  # KV heads are split across ranks, or replicated when there are fewer than ranks
            rank = qkv.tp_rank // qkv.num_kv_head_replicas

        def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
            size = param.shape[0]
            if loaded.shape[0] < (rank + 1) * size:
                raise ValueError(
                    f"gate {p!r}: checkpoint shape {tuple(loaded.shape)} too small for rank {rank}"
                )
            param.data.copy_(loaded.narrow(0, rank * size, size))

        return load

    # -------------------------------------------------------------------------------- projection
    def _project(
        self, module: nn.Module, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> Projections:
        """Q, K, V (T, heads*d) of an attention module on (possibly refined) inputs; pre-RoPE.

        q/k/v live in one stacked `qkv_proj`: each distinct input is projected once and the needed
        slice kept (at level 1 all three inputs are X: one matmul, like the base model).
        """
        sizes = [self.q_size, self.kv_size, self.kv_size]
        inputs = (xq, xk, xv)
        outputs: list[torch.Tensor] = []
        done: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
        for i, x in enumerate(inputs):
            split = next((s for y, s in done if y is x), None)
            if split is None:
                split = module.qkv_proj(x)[0].split(sizes, dim=-1)
                done.append((x, split))
            outputs.append(split[i])
        q, k, v = outputs
        if self.qk_norm:  # Qwen3
            q = module.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = module.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        return q, k, v

    # --------------------------------------------------------------------------- inner attention
    def _inner(
        self, positions: torch.Tensor, level: int, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """{p: Inner_p} at one level of `separate`/`shared`: each sub-attention of the level once."""
        xq, xk, xv = inputs["q"], inputs["k"], inputs["v"]
        passes = {
            sub.projection: self._inner_pass(
                positions,
                self if sub.projection is None else self.inner[sub.projection],
                xq,
                xk,
                xv,
                sub.name,
            )
            for sub in self.reading.sub_attentions(self.nexus.projections, self.nexus.order)
            if sub.level == level
        }
        return inner_outputs(
            self.reading, self.nexus.projections, getattr(self, "gates", None), self.gate_spec, self.head_dim,
            heads_of=lambda p: passes[None] if self.reading.one_pass else passes[p],
            o_proj=lambda p, heads: (self if self.reading.one_pass else self.inner[p]).o_proj(heads)[0],
        )  # fmt: skip

    def _inner_pass(
        self,
        positions: torch.Tensor,
        module: nn.Module,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        name: str,
    ) -> torch.Tensor:
        """Attention of `module` (its q/k/v, the layer's RoPE) on the inputs: heads (T, heads*d), before o_proj."""
        q, k, v = self._project(module, xq, xk, xv)
        q, k = self.rotary_emb(positions, q, k)  # in place on q, k: fresh projections, used once
        return self.inner_attn[name](q, k, v)

    def _attend_self(
        self, positions: torch.Tensor, level: int, heads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One level of `self` (Eq. 7-8): softmax(R(P) R(P)^T s + M) P per head of each refined p."""
        out = {}
        for p in self.nexus.projections:
            z = heads[p]  # (T, heads_p * d), not rotated
            rz = self.rotary_emb(positions, z.clone(), None)[0]  # rotates in place: keep z for the values
            out[p] = self.inner_attn[f"{p}_level{level}"](rz, rz, z)
        return out

    # ----------------------------------------------------------------------------------- forward
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states  # (T, hidden), after the input norm
        nexus, gates = self.nexus, getattr(self, "gates", None)
        if self.reading.on_heads:  # Eq. 7-8, nexus_core.refine_heads
            q, k, v = self._project(self, x, x, x)
            heads = refine_heads(
                {"q": q, "k": k, "v": v}, self.reading, nexus.projections, nexus.order, gates, self.gate_spec,
                self.head_dim, lambda level, h: self._attend_self(positions, level, h),
            )  # fmt: skip
            q, k, v = heads["q"], heads["k"], heads["v"]
        else:  # Eq. 10-11, nexus_core.refine_inputs
            inputs = refine_inputs(
                x, self.reading, nexus.projections, nexus.order, gates, self.gate_spec, self.head_dim,
                lambda level, i: self._inner(positions, level, i),
            )  # fmt: skip
            q, k, v = self._project(self, inputs["q"], inputs["k"], inputs["v"])
        # Outer attention: exactly the base layer's computation on the refined Q/K/V.
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out)[0]


class _QwenNexusAttention(NexusVllmAttentionMixin):
    """Qwen2 and Qwen3: vLLM's attention class takes keyword arguments; the `nexus` block comes apart."""

    def __init__(self, *, nexus: NexusConfig | dict[str, Any], **kwargs):
        if kwargs.get("dual_chunk_attention_config"):
            raise NotImplementedError("Nexus attention does not support dual-chunk attention")
        super().__init__(**kwargs)
        self._init_nexus(nexus, kwargs.get("cache_config"), kwargs.get("quant_config"), kwargs["prefix"])


class NexusQwen2Attention(_QwenNexusAttention, Qwen2Attention):
    pass


class NexusQwen3Attention(_QwenNexusAttention, Qwen3Attention):
    pass


class NexusLlamaAttention(NexusVllmAttentionMixin, LlamaAttention):
    """Llama and Mistral (HF format): built by vLLM's LlamaDecoderLayer through `attn_layer_type`."""

    def __init__(self, config: PretrainedConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self._init_nexus(
            config.nexus, kwargs.get("cache_config"), kwargs.get("quant_config"), kwargs["prefix"]
        )


__all__ = [
    "NexusVllmAttentionMixin",
    "NexusInnerProjections",
    "NexusLlamaAttention",
    "NexusQwen2Attention",
    "NexusQwen3Attention",
]
