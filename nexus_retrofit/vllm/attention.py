"""Nexus higher-order attention (arXiv 2512.03377) built from vLLM parts.

Subclass, don't fork: `NexusQwen2Attention`, `NexusQwen3Attention` and `NexusLlamaAttention` are
vLLM's own attention classes (their `qkv_proj`, `o_proj`, rotary embedding, Qwen3's q/k norms and
their `attn`, which becomes the outer attention) with the Nexus levels added in front. The maths is
exactly `nexus_retrofit/modeling/modeling_nexus.py` (the reference; docs/DESIGN.md §1):

    X_p^(0) = X
    X_p^(l) = X + g_p * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))     l = 1 .. m-1 (Eq. 10-11)
    O       = Attn(X_q^(m-1), X_k^(m-1), X_v^(m-1))                  the layer's own attention

(`self`: the same recursion on the pre-RoPE Q/K/V heads, Eq. 7-8; `gate="none"`: X_p = Inner_p).

Every distinct sub-attention is its own vLLM `Attention` with its own paged KV cache: one per
(level, refined projection) for `separate` and `self`, one per level for `shared` (its one inner
pass serves every projection). Layer names hold exactly one integer, the layer index, e.g.
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


class NexusAttentionMixin:
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
        # per-rank head counts of each projection (q: query heads; k, v: KV heads)
        self.proj_heads = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        nexus, levels = self.nexus, range(1, self.nexus.order)
        if nexus.inner == "separate" and nexus.levels > 0:
            self.inner = nn.ModuleDict(
                {
                    p: NexusInnerProjections(self, quant_config, f"{prefix}.inner.{p}")
                    for p in nexus.projections
                }
            )
        if nexus.gate != "none" and nexus.levels > 0:  # "zero" or "open": the gated residual
            self.gates = nn.ParameterDict({p: self._make_gate(p) for p in nexus.projections})

        def attention(name: str, num_heads: int, num_kv_heads: int) -> Attention:
            return Attention(
                num_heads,
                self.head_dim,
                self.scaling,
                num_kv_heads=num_kv_heads,
                cache_config=cache_config,
                quant_config=quant_config,
                per_layer_sliding_window=self.attn.sliding_window,
                prefix=f"{prefix}.inner_attn.{name}",
            )

        inner_attn: dict[str, Attention] = {}
        for level in levels:
            if nexus.inner == "shared":  # Eq. 12: one pass of the layer's own attention per level
                inner_attn[f"level{level}"] = attention(f"level{level}", self.num_heads, self.num_kv_heads)
            elif nexus.inner == "separate":  # same head layout (and GQA) as the base attention
                for p in nexus.projections:
                    name = f"{p}_level{level}"
                    inner_attn[name] = attention(name, self.num_heads, self.num_kv_heads)
            else:  # self: per head, so no GQA; the q-side cache holds every query head
                for p in nexus.projections:
                    name = f"{p}_level{level}"
                    inner_attn[name] = attention(name, self.proj_heads[p], self.proj_heads[p])
        self.inner_attn = nn.ModuleDict(inner_attn)

    # ------------------------------------------------------------------------------------ gates
    def _make_gate(self, p: str) -> nn.Parameter:
        """Gate g_p as the HF model shapes it (NexusConfig.gate_shape), this rank's part of it.

        scalar: one value (replicated). channel: the hidden size for separate/shared (replicated), the
        projection's heads x head_dim for self (sharded like those heads). head: one value per inner
        head, sharded like the heads it scales (query heads for separate/shared, p's heads for self).
        """
        shape, per_head = self.nexus.gate_shape, self.nexus.inner == "self"
        if shape == "scalar" or (shape == "channel" and not per_head):
            width = 1 if shape == "scalar" else self.hidden_size
            return nn.Parameter(torch.zeros(width), requires_grad=False)
        heads_of = p if per_head else "q"
        width = self.proj_heads[heads_of] * (self.head_dim if shape == "channel" else 1)
        gate = nn.Parameter(torch.zeros(width), requires_grad=False)
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

    def _gate_values(self, p: str) -> torch.Tensor:
        """f(g_p), flat: the gate as it multiplies the inner output (NexusConfig.gate_fn)."""
        gate = self.gates[p]
        return torch.tanh(gate) if self.nexus.gate_fn == "tanh" else gate

    def _per_head_gates(self) -> bool:
        return self.nexus.gate != "none" and self.nexus.gate_shape == "head"

    def _head_gated(self, heads: torch.Tensor, p: str) -> torch.Tensor:
        """Per-head gates scale the inner attention's heads (T, heads*d) before its o_proj."""
        if not self._per_head_gates():
            return heads
        return (heads.view(heads.shape[0], -1, self.head_dim) * self._gate_values(p)[:, None]).view(
            heads.shape
        )

    def _gated(self, base: torch.Tensor, inner_out: torch.Tensor, p: str) -> torch.Tensor:
        """X_p = X + f(g_p) * Inner_p(X) (Eq. 10-11, gated residual), or the paper's X_p = Inner_p(X)."""
        if self.nexus.gate == "none":
            return inner_out
        if self.nexus.gate_shape == "head" and self.nexus.inner != "self":
            return base + inner_out  # the head gates scaled the inner heads before o_proj
        gate = self._gate_values(p)
        if self.nexus.gate_shape == "head":  # self: one value per head of p, over its head_dim
            gate = gate.repeat_interleave(self.head_dim)
        return base + gate * inner_out

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
    def _refine_inputs(
        self, positions: torch.Tensor, x: torch.Tensor, inputs: dict[str, torch.Tensor], level: int
    ) -> dict[str, torch.Tensor]:
        """One level of `separate`/`shared`: refined inputs {p: X_p^(level)} from inputs^(level-1)."""
        xq, xk, xv = inputs["q"], inputs["k"], inputs["v"]
        refined = dict(inputs)
        if self.nexus.inner == "shared":  # one pass serves every p; only per-head gates tell them apart
            heads = self._inner_pass(positions, self, xq, xk, xv, f"level{level}")
            shared_out = None if self._per_head_gates() else self.o_proj(heads)[0]
            for p in self.nexus.projections:
                y = shared_out if shared_out is not None else self.o_proj(self._head_gated(heads, p))[0]
                refined[p] = self._gated(x, y, p)
        else:
            for p in self.nexus.projections:
                module = self.inner[p]
                heads = self._inner_pass(positions, module, xq, xk, xv, f"{p}_level{level}")
                refined[p] = self._gated(x, module.o_proj(self._head_gated(heads, p))[0], p)
        return refined

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

    def _refine_heads(
        self,
        positions: torch.Tensor,
        base: dict[str, torch.Tensor],
        heads: dict[str, torch.Tensor],
        level: int,
    ) -> dict[str, torch.Tensor]:
        """One level of `self` (Eq. 7-8): P' = softmax(R(P) R(P)^T s + M) P per head, then gated."""
        refined = dict(heads)
        for p in self.nexus.projections:
            z = heads[p]  # (T, heads_p * d), not rotated
            rz = self.rotary_emb(positions, z.clone(), None)[0]  # rotates in place: keep z for the values
            out = self.inner_attn[f"{p}_level{level}"](rz, rz, z)
            refined[p] = self._gated(base[p], out, p)
        return refined

    # ----------------------------------------------------------------------------------- forward
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states  # (T, hidden), after the input norm
        levels = range(1, self.nexus.order)
        if self.nexus.inner == "self":
            q, k, v = self._project(self, x, x, x)
            base = {"q": q, "k": k, "v": v}
            heads = base
            for level in levels:
                heads = self._refine_heads(positions, base, heads, level)
            q, k, v = heads["q"], heads["k"], heads["v"]
        else:
            inputs = {"q": x, "k": x, "v": x}
            for level in levels:
                inputs = self._refine_inputs(positions, x, inputs, level)
            q, k, v = self._project(self, inputs["q"], inputs["k"], inputs["v"])
        # Outer attention: exactly the base layer's computation on the refined Q/K/V.
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out)[0]


class _QwenNexusAttention(NexusAttentionMixin):
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


class NexusLlamaAttention(NexusAttentionMixin, LlamaAttention):
    """Llama and Mistral (HF format): built by vLLM's LlamaDecoderLayer through `attn_layer_type`."""

    def __init__(self, config: PretrainedConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self._init_nexus(
            config.nexus, kwargs.get("cache_config"), kwargs.get("quant_config"), kwargs["prefix"]
        )


__all__ = [
    "NexusAttentionMixin",
    "NexusInnerProjections",
    "NexusLlamaAttention",
    "NexusQwen2Attention",
    "NexusQwen3Attention",
]
