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
call by stacking their heads, and each level owns one KV-cache slot. Within a level, projections of
one input are one matmul and RoPE runs once over stacked q+k heads (`_Projector`): decoding time is
mostly kernel launches, and this keeps a Nexus layer to 1.2-1.3x the base layer's launches at
order 2 (`nexus-retrofit bench counts`).
"""

from __future__ import annotations

from collections.abc import Callable

# configuration_nexus first: it refuses a transformers older than the tested range in one line,
# before an import below could fail with a less helpful error.
from .configuration_nexus import (  # isort: skip
    TESTED_TRANSFORMERS,
    NexusConfig,
    NexusLlamaConfig,
    NexusMistralConfig,
    NexusQwen2Config,
    NexusQwen3Config,
)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.models.llama.modeling_llama import (  # noqa: E402
    eager_attention_forward as _eager_attention_forward,
)
from transformers.models.mistral.modeling_mistral import (  # noqa: E402
    MistralAttention,
    MistralForCausalLM,
    MistralModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2ForCausalLM, Qwen2Model  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM, Qwen3Model  # noqa: E402

# The keywords under which transformers has handed the KV cache to an attention module:
# `past_key_values` up to 5.23, `cache` from 5.24 (the old name is a deprecated alias until 5.40).
CACHE_KEYWORDS = ("cache", "past_key_values")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, n, d) with cos/sin of shape (B, n, d); same arithmetic as transformers'."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is exactly `linear(x, weight, bias)`: safe to fuse with others."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


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


class _Projector:
    """Q/K/V heads of one layer's forward pass: `heads(modules, p, x)` is the p-projection of every
    module in `modules` on input x, as heads (B, n, |modules| * h, d) stacked in module order,
    pre-RoPE (Qwen3's per-head norm applied).

    Memoised for the forward pass: an unrefined projection reads the same X at every level (V for
    QK, and the `shared` outer V, which is its level-1 inner V), so it is computed once. When q, k
    and v all read one X (level 1), every projection of every module is one matmul on the
    concatenated weights, laid out [q of each module | k ... | v ...] so each block, and the q+k
    block that RoPE reads, is a view: one kernel instead of 3|P| linears and their concatenations,
    and decoding time is made of kernels. The weights are concatenated per call (no second copy is
    kept), and only plain nn.Linear projections are fused (a PEFT/LoRA-wrapped or hooked projection
    keeps its own call).
    """

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.memo: dict[tuple, torch.Tensor] = {}  # keyed by (module ids, p, id(input))
        self.inputs: list[torch.Tensor] = []  # keeps every keyed input alive, so no id is reused

    @staticmethod
    def _key(modules: list[nn.Module], p: str, x: torch.Tensor) -> tuple:
        return (tuple(map(id, modules)), p, id(x))

    def _store(self, modules: list[nn.Module], p: str, x: torch.Tensor, heads: torch.Tensor) -> None:
        self.inputs.append(x)
        self.memo[self._key(modules, p, x)] = heads

    def _as_heads(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(*y.shape[:-1], -1, self.head_dim)

    def _normed(self, modules: list[nn.Module], p: str, block: torch.Tensor) -> torch.Tensor:
        if p == "v" or not hasattr(modules[0], "q_norm"):
            return block
        parts = block.chunk(len(modules), dim=2)  # Qwen3: each module's own RMSNorm per head
        return torch.cat([getattr(m, f"{p}_norm")(part) for m, part in zip(modules, parts)], dim=2)

    def _fuse(self, modules: list[nn.Module], x: torch.Tensor) -> bool:
        linears = [getattr(m, f"{p}_proj") for p in "qkv" for m in modules]
        has_bias = {lin.bias is not None for lin in linears}
        if not all(map(_is_plain_linear, linears)) or len(has_bias) > 1:
            return False
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if has_bias == {True} else None
        y = nn.functional.linear(x, weight, bias)  # (B, n, sum of out_features)
        k = len(modules)
        widths = [sum(lin.out_features for lin in linears[i * k : (i + 1) * k]) for i in range(3)]
        q, kk, v = y.split(widths, dim=-1)
        for p, block in zip("qkv", (q, kk, v)):
            self._store(modules, p, x, self._normed(modules, p, self._as_heads(block)))
        if not hasattr(modules[0], "q_norm"):
            self._store(modules, "qk", x, self._as_heads(y[..., : widths[0] + widths[1]]))
        return True

    def heads(
        self, modules: list[nn.Module], p: str, x: torch.Tensor, same_input: bool = False
    ) -> torch.Tensor:
        """p-heads of `modules` on x; `same_input`: q, k and v of this call all read x (fusable)."""
        key = self._key(modules, p, x)
        if key not in self.memo and not (same_input and self._fuse(modules, x)):
            parts = [self._as_heads(getattr(m, f"{p}_proj")(x)) for m in modules]
            block = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            self._store(modules, p, x, self._normed(modules, p, block))
        return self.memo[key]

    def qkv_heads(self, modules: list[nn.Module], inputs: dict[str, torch.Tensor]):
        """Query and key heads stacked (B, n, Hq + Hk, d) (a view when fused), the query head count,
        and the value heads, of `modules` on the inputs {p: X_p}."""
        xq, xk, xv = inputs["q"], inputs["k"], inputs["v"]
        same_input = xq is xk is xv
        q = self.heads(modules, "q", xq, same_input)
        joint = self.memo.get(self._key(modules, "qk", xq)) if xq is xk else None
        if joint is None:
            joint = torch.cat([q, self.heads(modules, "k", xk, same_input)], dim=2)
        return joint, q.shape[2], self.heads(modules, "v", xv, same_input)


def _version_error(what: str) -> RuntimeError:
    low, high = TESTED_TRANSFORMERS
    return RuntimeError(
        f"Nexus attention: transformers {transformers.__version__} {what}, so this layer would compute "
        f"something else than its full forward. This modeling code is tested on transformers {low} to "
        f"{high}: install a release in that range, or upgrade nexus-retrofit and load the checkpoint with "
        "it installed (its classes replace the bundled code)."
    )


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
        if nexus.gate != "none" and nexus.levels > 0:
            self.gates = nn.ParameterDict(
                {
                    p: nn.Parameter(torch.full((self._gate_width(p),), nexus.gate_start))
                    for p in nexus.projections
                }
            )
        self.probe_path = False  # set by the trainer on logging steps: record path_strength in forward
        self.path_strength: dict[str, float] = {}

    # ----------------------------------------------------------------------------------- helpers
    def _heads(self, p: str) -> int:
        return self.num_heads if p == "q" else self.num_kv_heads

    def _gate_width(self, p: str) -> int:
        """Number of gate values of projection p: one per channel, per inner head, or one."""
        shape = self.nexus.gate_shape
        if shape == "scalar":
            return 1
        if shape == "head":  # the heads of the inner attention (self: the projection's own heads)
            return self._heads(p) if self.nexus.inner == "self" else self.num_heads
        # separate/shared refine the layer input (hidden size); self refines one projection's heads.
        return self._heads(p) * self.head_dim if self.nexus.inner == "self" else self.config.hidden_size

    def gate_values(self, p: str) -> torch.Tensor:
        """f(g_p): the gate as it multiplies the inner output (gate_fn applied), flat."""
        gate = self.gates[p]
        return torch.tanh(gate) if self.nexus.gate_fn == "tanh" else gate

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

    def _attend(self, q, k, v, attention_mask, past_key_values, slot: int, groups: int, **kwargs):
        """One attention kernel call through transformers' dispatch on (B, heads, n, d); returns (B, n, heads, d)."""
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
        """X_p = X + f(g_p) * Inner_p(X) (gated residual), or the paper's X_p = Inner_p(X) (Eq. 10-11)."""
        if self.nexus.gate == "none":
            refined = inner_out
        elif self.nexus.gate_shape == "head" and self.nexus.inner != "self":
            refined = base + inner_out  # the head gates scaled the inner heads before o_proj
        else:
            gate = self.gate_values(p)
            if self.nexus.inner == "self":  # heads are (B, n, h, d): per head and dimension, or per head
                gate = (
                    gate.view(-1, self.head_dim) if self.nexus.gate_shape == "channel" else gate.view(-1, 1)
                )
            refined = torch.addcmul(base, gate, inner_out)  # one kernel
        if self.probe_path:
            self._record_path_strength(base, refined, p)
        return refined

    @torch.no_grad()
    def _record_path_strength(self, base: torch.Tensor, refined: torch.Tensor, p: str) -> None:
        """||X_p - X|| / ||X|| (the gated path's share, ||f(g) * Inner_p(X)|| / ||X||) at the last level."""
        path = refined if self.nexus.gate == "none" else refined - base
        self.path_strength[p] = (path.float().norm() / base.float().norm().clamp_min(1e-12)).item()

    def _inner_output(self, module: nn.Module, heads: torch.Tensor, p: str) -> torch.Tensor:
        """Inner o_proj on the inner attention's heads (B, n, H*d); per-head gates scale the heads first."""
        if self.nexus.gate != "none" and self.nexus.gate_shape == "head":
            scaled = heads.view(*heads.shape[:-1], self.num_heads, -1) * self.gate_values(p)[:, None]
            heads = scaled.flatten(-2)
        return module.o_proj(heads)

    @staticmethod
    def _rope_qk(qk: torch.Tensor, q_heads: int, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on query and key heads stacked (B, n, Hq + Hk, d) in one pass; q, k as (B, heads, n, d).

        One RoPE instead of one per tensor: fewer kernels per layer. Per element, the base model's
        arithmetic.
        """
        z = _rope(qk.transpose(1, 2), cos, sin)
        return z[:, :q_heads], z[:, q_heads:]

    # ------------------------------------------------------------------------- inner attention
    def _refine_inputs(self, x, inputs, level, project, cos, sin, attention_mask, past_key_values, **kwargs):
        """One level of `separate`/`shared`: new refined inputs {p: X_p^(level)} from inputs^(level-1)."""
        if self.nexus.inner == "shared":
            modules = [self]  # Eq. 12: the layer's own attention; one pass serves every projection
        else:
            modules = [self.inner[p] for p in self.nexus.projections]
        # Fuse the |P| independent attentions of this level by stacking heads: with the same GQA
        # grouping inside each block, head i of block b still reads KV head b*Hkv + i // groups.
        qk, q_heads, v = project.qkv_heads(modules, inputs)
        q, k = self._rope_qk(qk, q_heads, cos, sin)
        v = v.transpose(1, 2)
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
        out = out.view(*x.shape[:-1], len(modules), -1)  # (B, n, modules, H*d): no copy per module
        if self.nexus.inner == "shared" and not (
            self.nexus.gate_shape == "head" and self.nexus.gate != "none"
        ):
            ys = [self.o_proj(out[..., 0, :])] * len(self.nexus.projections)  # one pass serves every p
        else:
            owners = modules * len(self.nexus.projections) if self.nexus.inner == "shared" else modules
            ys = [
                self._inner_output(m, out[..., i % len(modules), :], p)
                for i, (m, p) in enumerate(zip(owners, self.nexus.projections))
            ]
        refined = dict(inputs)
        for p, y in zip(self.nexus.projections, ys):
            refined[p] = self._gated(x, y, p)
        return refined

    def _refine_heads(self, base, heads, level, cos, sin, attention_mask, past_key_values, **kwargs):
        """One level of `self` (Eq. 7-8): P' = softmax(R(P) R(P)^T s + M) P per head, then gated.

        Heads are (B, n, h, d), pre-RoPE; every refined projection's heads go in one kernel call.
        """
        ps = self.nexus.projections
        z = torch.cat([heads[p] for p in ps], dim=2).transpose(1, 2)  # (B, H + Hkv [+ Hkv], n, d)
        rz = _rope(z, cos, sin)
        out, _ = self._attend(
            rz, rz, z, attention_mask, past_key_values, self._cache_slot(level), 1, **kwargs
        )  # (B, n, heads, d)
        refined = dict(heads)
        for p, o in zip(ps, out.split([self._heads(p) for p in ps], dim=2)):
            refined[p] = self._gated(base[p], o, p)
        return refined

    # ------------------------------------------------------------------------------------ forward
    def _checked_cache(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        caches: dict[str, Cache | None],
        kwargs: dict,
    ) -> Cache | None:
        """The KV cache, under whichever name this transformers passed it; an error, never a silent
        cache-less forward, when the call is decoding against earlier tokens and no cache arrived.

        Without its cache a Nexus layer attends only to the new tokens: a forward that looks fine and
        computes something else than the full forward. A future rename must fail here, loudly.
        """
        given = [c for c in caches.values() if c is not None]
        if len(given) > 1 and given[0] is not given[1]:
            raise ValueError(f"Nexus attention got two different caches under {list(caches)}; pass one.")
        cache = given[0] if given else None
        unknown = sorted(name for name, value in kwargs.items() if isinstance(value, Cache))
        if unknown:
            raise _version_error(f"passed a KV cache under the unknown keyword(s) {unknown}")
        if cache is None:
            q_len = hidden_states.shape[1]
            kv_len = attention_mask.shape[-1] if attention_mask is not None else q_len
            cache_position = kwargs.get("cache_position")
            position_ids = kwargs.get("position_ids")
            if kwargs.get("use_cache") is True:
                reason = "asked for a KV cache (use_cache=True)"
            elif cache_position is not None and cache_position.numel() and int(cache_position.min()) > 0:
                reason = f"is decoding at cache position {int(cache_position.min())}"
            elif q_len == 1 and position_ids is not None and int(position_ids.min()) > 0:
                reason = f"is decoding one token at position {int(position_ids.min())}"
            elif kv_len > q_len:
                reason = f"is decoding {q_len} new token(s) against {kv_len} in the attention mask"
            else:
                return None
            raise _version_error(f"{reason} but passed no cache under {list(CACHE_KEYWORDS)}")
        own = cache.layers[self.layer_idx] if self.layer_idx < len(getattr(cache, "layers", ())) else None
        if own is not None and type(own) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise NotImplementedError(
                f"Nexus attention supports DynamicCache only, not {type(own).__name__} (e.g. a static cache): "
                "generate with cache_implementation='dynamic' (the default)."
            )
        return cache

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = self._checked_cache(
            hidden_states, attention_mask, {"cache": cache, "past_key_values": past_key_values}, kwargs
        )
        x = hidden_states  # (B, n, hidden)
        cos, sin = position_embeddings
        levels = range(1, self.nexus.order)
        project = _Projector(self.head_dim)
        if self.nexus.inner == "self":
            base = {p: project.heads([self], p, x, same_input=True) for p in "qkv"}  # (B, n, h, d)
            heads = base
            for level in levels:
                heads = self._refine_heads(
                    base, heads, level, cos, sin, attention_mask, past_key_values, **kwargs
                )
            q, k, v = heads["q"], heads["k"], heads["v"]
            qk, q_heads = torch.cat([q, k], dim=2), q.shape[2]
        else:
            inputs = {"q": x, "k": x, "v": x}
            for level in levels:
                inputs = self._refine_inputs(
                    x, inputs, level, project, cos, sin, attention_mask, past_key_values, **kwargs
                )
            qk, q_heads, v = project.qkv_heads([self], inputs)
        # Outer attention: exactly the base layer's computation on the refined Q/K/V.
        q, k = self._rope_qk(qk, q_heads, cos, sin)
        out, weights = self._attend(
            q,
            k,
            v.transpose(1, 2),
            attention_mask,
            past_key_values,
            self.layer_idx,
            self.num_key_value_groups,
            **kwargs,
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
    """On top of the family's init: gates at their start value (0, or 1 for gate="open") and, with
    inner_init="zero_out", the inner o_proj at 0 (the function-preserving retrofit)."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NexusAttentionMixin):
            init_nexus_parameters(module)


@torch.no_grad()
def _start_nexus_parameters(model: nn.Module) -> None:
    """After post_init: the family's init pass runs on the inner `Model` with the family's own
    `_init_weights`, which knows no gates; put every gate (and zero_out o_proj) at its start value."""
    for module in model.modules():
        if isinstance(module, NexusAttentionMixin):
            init_nexus_parameters(module)


def init_nexus_parameters(attention: NexusAttentionMixin) -> None:
    """Gates to NexusConfig.gate_start; with inner_init="zero_out", every inner o_proj to 0."""
    nexus = attention.nexus
    for gate in getattr(attention, "gates", {}).values():
        init.constant_(gate, nexus.gate_start)
    if nexus.inner_init == "zero_out" and hasattr(attention, "inner"):  # order 1 has none
        for inner in attention.inner.values():
            init.zeros_(inner.o_proj.weight)
            if inner.o_proj.bias is not None:
                init.zeros_(inner.o_proj.bias)


class NexusQwen2Model(_NexusPreTrainedMixin, Qwen2Model):
    config_class = NexusQwen2Config

    def __init__(self, config: NexusQwen2Config):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusQwen2Attention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusQwen2ForCausalLM(_NexusPreTrainedMixin, Qwen2ForCausalLM):
    config_class = NexusQwen2Config

    def __init__(self, config: NexusQwen2Config):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusQwen2Attention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusLlamaModel(_NexusPreTrainedMixin, LlamaModel):
    config_class = NexusLlamaConfig

    def __init__(self, config: NexusLlamaConfig):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusLlamaAttention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusLlamaForCausalLM(_NexusPreTrainedMixin, LlamaForCausalLM):
    config_class = NexusLlamaConfig

    def __init__(self, config: NexusLlamaConfig):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusLlamaAttention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusMistralModel(_NexusPreTrainedMixin, MistralModel):
    config_class = NexusMistralConfig

    def __init__(self, config: NexusMistralConfig):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusMistralAttention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusMistralForCausalLM(_NexusPreTrainedMixin, MistralForCausalLM):
    config_class = NexusMistralConfig

    def __init__(self, config: NexusMistralConfig):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusMistralAttention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusQwen3Model(_NexusPreTrainedMixin, Qwen3Model):
    config_class = NexusQwen3Config

    def __init__(self, config: NexusQwen3Config):
        super().__init__(config)
        _install_nexus_attention(self.layers, config, NexusQwen3Attention)
        self.post_init()
        _start_nexus_parameters(self)


class NexusQwen3ForCausalLM(_NexusPreTrainedMixin, Qwen3ForCausalLM):
    config_class = NexusQwen3Config

    def __init__(self, config: NexusQwen3Config):
        super().__init__(config)
        _install_nexus_attention(self.model.layers, config, NexusQwen3Attention)
        self.post_init()
        _start_nexus_parameters(self)


# save_pretrained copies this file (and configuration_nexus.py, which it imports) next to the weights.
for _cls in (NexusQwen2ForCausalLM, NexusLlamaForCausalLM, NexusMistralForCausalLM, NexusQwen3ForCausalLM):
    _cls.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "NexusAttentionMixin",
    "init_nexus_parameters",
    "NexusQwen2Model",
    "NexusQwen2ForCausalLM",
    "NexusLlamaModel",
    "NexusLlamaForCausalLM",
    "NexusMistralModel",
    "NexusMistralForCausalLM",
    "NexusQwen3Model",
    "NexusQwen3ForCausalLM",
]
