"""Nexus higher-order attention (arXiv 2512.03377) for Qwen2, Llama, Mistral, Qwen3 and GPT-NeoX (Pythia).

Subclass, don't fork: each Nexus model is the transformers model with its attention modules
replaced by a Nexus attention that subclasses the family's own attention class. RoPE, masks,
generation, gradient checkpointing and attention dispatch (eager / sdpa / flash) stay upstream's.

This file is copied into every converted checkpoint (`auto_map`): it imports only torch,
transformers and its sibling configuration_nexus.py.

Notation (docs/DESIGN.md §1): X is the layer input after the input norm, P the refined projections,
m the order, f the gate function. Levels l = 1 .. m-1 compute the inner attentions; the outer (level
m) attention is the layer's own, fed with the refined inputs of level m-1:

    X_p^(0) = X
    X_p^(l) = X + f(g_p) * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))     (Eq. 10-11, gated residual)
    O       = Attn(X_q^(m-1), X_k^(m-1), X_v^(m-1))

The recursion and what each reading decides (gate widths, the gate, one pass or one per projection)
are written once, in nexus_core.py; this file is the transformers wrapper around it: the attention
dispatch, the KV cache slots, the fused projections, the version and decoding checks. `forward`
reads in the paper's order: refine the inputs level by level (`_refined_heads`, Eq. 10-11; `self`:
`_self_refined_heads`, Eq. 7-8), project, rotate, cache, attend. All inner attentions of one level read the same inputs, so the paper's
2^m - 1 calls (Eq. 13) collapse to 1 + |P|(m-1) distinct calls; the |P| calls of a level are one
kernel call over stacked heads with one KV-cache slot per level. Level 1 reads X everywhere, so its
q/k/v are one matmul (`project_all`), and the projections of X made there serve every later level.
Decoding time is mostly kernel launches: this keeps a Nexus layer to 1.2-1.3x the base layer's
launches at order 2 (`nexus-retrofit bench counts`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# configuration_nexus first: it refuses a transformers older than the tested range in one line,
# before an import below could fail with a less helpful error.
from .configuration_nexus import (  # isort: skip
    TESTED_TRANSFORMERS,
    NexusConfig,
    NexusGPTNeoXConfig,
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
from transformers.models.gpt_neox.modeling_gpt_neox import (  # noqa: E402
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
)
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

from .nexus_core import Dims, GateSpec, gate_factor, inner_outputs, reading, refine_heads, refine_inputs  # noqa: E402

# The keywords under which transformers has handed the KV cache to an attention module:
# `past_key_values` up to 5.23, `cache` from 5.24 (the old name is a deprecated alias until 5.40).
CACHE_KEYWORDS = ("cache", "past_key_values")


def family_rotary(attention_class: type[nn.Module]) -> Callable:
    """The `apply_rotary_pos_emb` of the modeling file that defines `attention_class`: the very object
    the family's stock attention calls, looked up on every call.

    Looked up, not imported once, so whatever replaces it reaches both arms alike: transformers 5.25's
    Hub kernels (with `kernels` installed the function is a module whose forward `kernelize` swaps on
    CUDA), Liger's patch of the module-level name. It also carries the family's own layout: GPT-NeoX's
    rotates only the channels cos/sin cover (partial `rotary_pct`); the others rotate the whole head.
    """
    return vars(sys.modules[attention_class.__module__])["apply_rotary_pos_emb"]


def _fusable(linear: nn.Module) -> bool:
    """A plain nn.Linear whose full weight is in hand: safe to concatenate with others into one matmul.

    Anything else keeps its own call: a PEFT/LoRA wrapper or a hooked module (its forward is not
    `linear(x, W, b)`; DeepSpeed ZeRO-3 gathers weights in such hooks), a weight that ZeRO-3
    partitioned (`ds_id`) or that FSDP flattened (not shaped (out, in)): outside the module's own
    forward, their data is not the weight.
    """
    weight = linear.weight
    return (
        type(linear) is nn.Linear
        and not _is_dtensor(weight)  # tensor parallelism (tp_plan): a shard, not the whole weight
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
        and not hasattr(weight, "ds_id")
        and tuple(weight.shape) == (linear.out_features, linear.in_features)
    )


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def kernels_unavailable() -> bool:
    """True where transformers turns Hub kernels on by default (5.25+: `use_kernels` unset means on)
    but the `kernels` package it needs is missing or of another version: every load would then fail
    with "Kernels are not available"."""
    from importlib.util import find_spec

    from packaging.version import Version

    if Version(transformers.__version__).release < (5, 25):
        return False
    try:
        from transformers.utils import is_kernels_available
    except ImportError:
        return find_spec("kernels") is None
    return not is_kernels_available()


_KERNELS_NOTICE = (
    "transformers {version} turns Hub kernels on by default but the `kernels` package is not installed "
    "(or not a compatible version): loading with use_kernels=False, the stock modules. Install `kernels` "
    "to use them, or set USE_HUB_KERNELS=0 to silence this."
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


@dataclass
class _Heads:
    """The q, k and v of one attention call as heads (B, n, heads, d), before RoPE. For stacked
    modules, block i of the head axis is module i. `qk_view` is q and k stacked on the head axis when
    that is a free view of one matmul's output (RoPE then runs once over both)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qk_view: torch.Tensor | None = None

    def qk(self) -> torch.Tensor:
        return self.qk_view if self.qk_view is not None else torch.cat([self.q, self.k], dim=2)


def _as_heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    return y.view(*y.shape[:-1], -1, head_dim)


def _qk_normed(modules: list[nn.Module], p: str, heads: torch.Tensor) -> torch.Tensor:
    """Qwen3's per-head RMSNorm on q and k, each module's own on its block of heads."""
    if p == "v" or not hasattr(modules[0], "q_norm"):
        return heads
    blocks = heads.chunk(len(modules), dim=2)
    return torch.cat([getattr(m, f"{p}_norm")(b) for m, b in zip(modules, blocks)], dim=2)


def project(modules: list[nn.Module], p: str, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The p-projection of every module in `modules` on x: heads stacked in module order."""
    blocks = [_as_heads(getattr(m, f"{p}_proj")(x), head_dim) for m in modules]
    return _qk_normed(modules, p, blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2))


def project_all(modules: list[nn.Module], x: torch.Tensor, head_dim: int) -> _Heads:
    """q, k and v of every module in `modules` on one input x.

    With plain Linears this is one matmul on the weights concatenated as [q of each module | k ... |
    v ...] (nanoGPT's fused c_attn, across modules), so every block, and the q+k block that RoPE
    reads, is a view: one kernel where decoding would launch 3|modules| linears and their
    concatenations. The weights are concatenated per call: no second copy is kept.
    """
    linears = [getattr(m, f"{p}_proj") for p in "qkv" for m in modules]
    with_bias = {lin.bias is not None for lin in linears}
    if not all(map(_fusable, linears)) or len(with_bias) > 1:
        return _Heads(*(project(modules, p, x, head_dim) for p in "qkv"))
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if with_bias == {True} else None
    y = nn.functional.linear(x, weight, bias)  # (B, n, sum of out_features)
    n = len(modules)
    widths = [sum(lin.out_features for lin in linears[i * n : (i + 1) * n]) for i in range(3)]
    q, k, v = (_qk_normed(modules, p, _as_heads(b, head_dim)) for p, b in zip("qkv", y.split(widths, dim=-1)))
    normed = hasattr(modules[0], "q_norm")  # normed blocks are new tensors: no joint view
    return _Heads(q, k, v, None if normed else _as_heads(y[..., : widths[0] + widths[1]], head_dim))


def project_interleaved(modules: list[nn.Module], p: str, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GPT-NeoX's `query_key_value`: the p-projection of every module on x, heads stacked in module order.

    Its weight holds, head by head, that head's q, k and v rows ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]), so
    the p rows are a strided slice: with a plain Linear only those rows are multiplied; otherwise (LoRA,
    hooks, ZeRO-3) the module runs whole and its p block is kept.
    """
    index = "qkv".index(p)
    blocks = []
    for m in modules:
        linear = m.query_key_value
        if _fusable(linear):
            rows = linear.weight.view(-1, 3, head_dim, linear.in_features)[:, index].reshape(
                -1, linear.in_features
            )
            bias = None if linear.bias is None else linear.bias.view(-1, 3, head_dim)[:, index].reshape(-1)
            blocks.append(_as_heads(nn.functional.linear(x, rows, bias), head_dim))
        else:
            blocks.append(_as_heads(linear(x), 3 * head_dim)[..., index * head_dim : (index + 1) * head_dim])
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def project_all_interleaved(modules: list[nn.Module], x: torch.Tensor, head_dim: int) -> _Heads:
    """q, k and v of every module on one input x through GPT-NeoX's fused `query_key_value`: one matmul
    over the modules' weights stacked (each head's [q k v] rows stay together), then q, k, v as views."""
    linears = [m.query_key_value for m in modules]
    if all(map(_fusable, linears)) and len({lin.bias is not None for lin in linears}) == 1:
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
        y = nn.functional.linear(x, weight, bias)
    else:
        y = torch.cat([lin(x) for lin in linears], dim=-1)
    q, k, v = _as_heads(y, 3 * head_dim).chunk(3, dim=-1)  # (B, n, modules * heads, d) each
    return _Heads(q, k, v)


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
    # The family's output projection (Llama-style `o_proj`, GPT-NeoX's `dense`); the q/k/v projections
    # are read through `_project` / `_project_all`, which a family with another layout overrides.
    output_projection = "o_proj"

    def __init__(self, config: transformers.PretrainedConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        nexus = NexusConfig.from_dict(config.nexus)
        self.nexus = nexus
        self.reading = reading(nexus.inner)  # what the reading decides: nexus_core.py
        self.gate_spec = GateSpec(nexus.gate, nexus.gate_shape, nexus.gate_fn)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = self._kv_heads(config)
        self.dims = Dims(config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim)
        if self.reading.inner_modules and nexus.levels > 0:
            # Sec. 4.4: one full attention module per refined projection, same head layout and RoPE
            # (the `mlp` control: a token-wise MLP of the same size instead).
            make = self.base_attention_class if self.reading.attends else self._token_mlp
            self.inner = nn.ModuleDict({p: make(config, layer_idx) for p in nexus.projections})
        if nexus.gate != "none" and nexus.levels > 0:
            self.gates = nn.ParameterDict(
                {
                    p: nn.Parameter(torch.full((self._gate_width(p),), nexus.gate_start))
                    for p in nexus.projections
                }
            )
        # (p, X_p^(l-1) or P, X_p^(l) or P^(l)) at every level, when the trainer installs a probe
        self.path_hook: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None

    # ----------------------------------------------------------------------------------- helpers
    @staticmethod
    def _kv_heads(config: transformers.PretrainedConfig) -> int:
        return config.num_key_value_heads

    def _token_mlp(self, config: transformers.PretrainedConfig, layer_idx: int) -> NexusTokenMLP:
        """MLP_p of the `mlp` control, with about the parameters of one inner attention module."""
        with torch.device("meta"):
            size = sum(p.numel() for p in self.base_attention_class(config, layer_idx).parameters())
        hidden = config.hidden_size
        width = max(1, round((size - hidden) / (2 * hidden + 1)))  # 2*h*w + w + h parameters
        return NexusTokenMLP(hidden, width, self.output_projection)

    def _project(self, modules: list[nn.Module], p: str, x: torch.Tensor) -> torch.Tensor:
        """The p-projection of `modules` on x, heads (B, n, heads, d) stacked in module order."""
        return project(modules, p, x, self.head_dim)

    def _project_all(self, modules: list[nn.Module], x: torch.Tensor) -> _Heads:
        """q, k and v of `modules` on one input x."""
        return project_all(modules, x, self.head_dim)

    def _output(self, module: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        """The output projection of `module` (the layer itself or an inner module) on flat heads."""
        return getattr(module, self.output_projection)(heads)

    def _gate_width(self, p: str) -> int:
        return self.reading.gate_width(p, self.gate_spec, self.dims)

    def _own_heads_shard(self) -> tuple[int, int]:
        """(this rank, ranks) of the tensor parallelism (tp_plan) that split the layer's own q/k/v
        heads; (0, 1) when they are whole. A colwise shard leaves each rank one contiguous block of
        heads, the block torch.chunk gives (GPT-NeoX's query_key_value too: each head's rows are
        together)."""
        weight = (self.q_proj if hasattr(self, "q_proj") else self.query_key_value).weight
        if not _is_dtensor(weight):
            return 0, 1
        weight = weight if hasattr(weight, "placements") else weight.data
        if not weight.placements[0].is_shard(0):  # e.g. a plan that replicates it
            return 0, 1
        return weight.device_mesh.get_local_rank(), weight.device_mesh.size()

    def _gates_on_own_heads(self, heads_of: Callable[[str], str]) -> Mapping[str, torch.Tensor] | None:
        """The gates that scale the layer's own heads (`self`; per-head gates of `shared`), cut to this
        rank's block of heads when tensor parallelism split them. The gates are in no tp plan: every
        rank holds them whole. `heads_of(p)`: the projection whose heads g_p covers."""
        gates = self._gates()
        rank, ranks = self._own_heads_shard()
        if gates is None or ranks == 1 or self.gate_spec.shape == "scalar":
            return gates
        return {
            p: g.view(self.dims.of(heads_of(p)), -1).chunk(ranks)[rank].flatten() for p, g in gates.items()
        }

    def gate_values(self, p: str) -> torch.Tensor:
        """f(g_p): the gate as it multiplies the inner output (gate_fn applied), flat."""
        return gate_factor(self.gates[p], self.gate_spec)

    def _gates(self) -> nn.ParameterDict | None:
        return getattr(self, "gates", None)

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

    def _cache_update(
        self, cache: Cache, key: torch.Tensor, value: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        slot: int,
        groups: int,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One attention kernel call through transformers' dispatch on (B, heads, n, d); returns (B, n, heads, d)."""
        if cache is not None:
            if slot == self.layer_idx:
                k, v = cache.update(k, v, slot)
            else:
                k, v = self._cache_update(cache, k, v, slot)
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

    def _rope_qk(
        self, qk: torch.Tensor, q_heads: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """R(q), R(k) from query and key heads stacked (B, n, Hq + Hk, d); q, k as (B, heads, n, d).

        Through the family's own rotary function, called as its stock attention calls it (one call
        for q and k), so both arms run the same rotary kernel, kernelized or not (`family_rotary`).
        """
        z = qk.transpose(1, 2)
        return family_rotary(self.base_attention_class)(z[:, :q_heads], z[:, q_heads:], cos, sin)

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self._checked_cache(
            hidden_states, attention_mask, {"cache": cache, "past_key_values": past_key_values}, kwargs
        )
        x = hidden_states  # (B, n, hidden), after the input norm
        cos, sin = position_embeddings
        if self.nexus.levels == 0:  # order 1: the base layer's own attention
            heads = self._project_all([self], x)
        elif not self.reading.attends:  # the token-wise control: X_p = X + f(g_p) * MLP_p(X)
            heads = self._mlp_refined_heads(x)
        elif self.reading.on_heads:
            heads = self._self_refined_heads(x, cos, sin, attention_mask, cache, **kwargs)  # Eq. 7-8
        else:
            heads = self._refined_heads(x, cos, sin, attention_mask, cache, **kwargs)  # Eq. 10-11
        # Outer attention (level m): exactly the base layer's computation on the refined heads.
        q, k = self._rope_qk(heads.qk(), heads.q.shape[2], cos, sin)
        out, weights = self._attend(
            q,
            k,
            heads.v.transpose(1, 2),
            attention_mask,
            cache,
            self.layer_idx,
            self.num_key_value_groups,
            **kwargs,
        )
        return self._output(self, out.reshape(*x.shape[:-1], -1).contiguous()), weights

    # ---------------------------------------------------------------- separate / shared (Eq. 10-12)
    def _refined_heads(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs,
    ) -> _Heads:
        """The outer attention's q/k/v heads, on the inputs refined level by level (nexus_core.refine_inputs):

        X_p^(0) = X,   X_p^(l) = X + f(g_p) * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1)),   l = 1 .. m-1
        """
        shared = self.reading.one_pass
        inner = [self] if shared else [self.inner[p] for p in self.nexus.projections]  # Eq. 12 / Sec. 4.4
        # Level 1 reads X everywhere: all q/k/v of the level in one matmul. These projections of X
        # hold at every level, so an unrefined one (V for QK) is taken from here, never recomputed.
        on_x = self._project_all(inner, x)

        def level_inner(level: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            heads = on_x if level == 1 else self._heads_on(inner, inputs, x, on_x)
            return self._inner_attention(inner, heads, level, cos, sin, attention_mask, cache, **kwargs)

        inputs = refine_inputs(
            x, self.reading, self.nexus.projections, self.nexus.order, self._gates(), self.gate_spec,
            self.head_dim, level_inner, self.path_hook,
        )  # fmt: skip
        # shared: the layer's own projections of X were made at level 1 (its outer V is its inner V)
        return self._heads_on([self], inputs, x, on_x if shared else None)

    def _heads_on(
        self, modules: list[nn.Module], inputs: dict[str, torch.Tensor], x: torch.Tensor, on_x: _Heads | None
    ) -> _Heads:
        """q/k/v heads of `modules` on the inputs {p: X_p}; a projection of X itself comes from `on_x`."""

        def heads(p: str) -> torch.Tensor:
            if on_x is not None and inputs[p] is x:
                return getattr(on_x, p)
            return self._project(modules, p, inputs[p])

        return _Heads(heads("q"), heads("k"), heads("v"))

    def _inner_attention(
        self,
        modules: list[nn.Module],
        heads: _Heads,
        level: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """{p: Inner_p(...)} (B, n, hidden) at one level: the |P| attentions as one kernel call over
        stacked heads (inside each block the GQA grouping is the layer's, so head i of block b reads
        KV head b*Hkv + i // groups), in the level's own cache slot; then each module's o_proj."""
        q, k = self._rope_qk(heads.qk(), heads.q.shape[2], cos, sin)
        out, _ = self._attend(
            q,
            k,
            heads.v.transpose(1, 2),
            attention_mask,
            cache,
            self._cache_slot(level),
            self.num_key_value_groups,
            **kwargs,
        )
        out = out.view(*out.shape[:2], len(modules), -1)  # (B, n, modules, H*d): a view per module
        block = {p: i % len(modules) for i, p in enumerate(self.nexus.projections)}  # shared: one block
        # per-head gates scale these heads: the layer's own (shared) may be this rank's block of them
        own = modules[0] is self and self.gate_spec.per_head
        gates = self._gates_on_own_heads(lambda p: "q") if own else self._gates()
        return inner_outputs(
            self.reading, self.nexus.projections, gates, self.gate_spec, self.head_dim,
            heads_of=lambda p: out[..., block[p], :],
            o_proj=lambda p, heads: self._output(modules[block[p]], heads),
        )  # fmt: skip

    def _mlp_refined_heads(self, x: torch.Tensor) -> _Heads:
        """The outer heads of the `mlp` control: one token-wise level, X_p = X + f(g_p) * MLP_p(X)."""
        inputs = refine_inputs(
            x, self.reading, self.nexus.projections, self.nexus.order, self._gates(), self.gate_spec,
            self.head_dim, lambda level, i: {p: self.inner[p](i[p]) for p in self.nexus.projections},
            self.path_hook,
        )  # fmt: skip
        return self._heads_on([self], inputs, x, None)

    # ------------------------------------------------------------------------------ self (Eq. 7-8)
    def _self_refined_heads(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs,
    ) -> _Heads:
        """The outer heads of the `self` reading (nexus_core.refine_heads): per head, P^(l) = P + f(g_p) *
        softmax(R(P^(l-1)) R(P^(l-1))^T s + M) P^(l-1), every refined projection's heads in one kernel
        call per level."""
        on_x = self._project_all([self], x)
        base = {p: getattr(on_x, p).flatten(-2) for p in "qkv"}  # (B, n, heads_p * d), views
        ps = self.nexus.projections

        def attend_self(level: int, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            stacked = torch.cat(
                [_as_heads(heads[p], self.head_dim) for p in ps], dim=2
            )  # (B, n, H + Hkv [+ Hkv], d)
            z = stacked.transpose(1, 2)
            # R on every stacked head: the family's rotary takes them as two blocks, like its q and k
            rz = torch.cat(self._rope_qk(stacked, z.shape[1] // 2, cos, sin), dim=1)
            out, _ = self._attend(rz, rz, z, attention_mask, cache, self._cache_slot(level), 1, **kwargs)
            # (B, n, heads_p, d) each; the heads this rank holds (tensor parallelism: a block of them)
            refined = out.split([heads[p].shape[-1] // self.head_dim for p in ps], dim=2)
            return {p: o.flatten(-2) for p, o in zip(ps, refined)}

        gates = self._gates_on_own_heads(lambda p: p)
        heads = refine_heads(
            base, self.reading, ps, self.nexus.order, gates, self.gate_spec, self.head_dim,
            attend_self, self.path_hook,
        )  # fmt: skip
        return _Heads(*(_as_heads(heads[p], self.head_dim) for p in "qkv"))

    # ------------------------------------------------------------------------------------ cache
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


class NexusTokenMLP(nn.Module):
    """MLP_p of the token-wise control (inner="mlp", not the paper's): hidden -> width -> hidden with
    GELU and biases. Its last layer has the family's output-projection name, so zero_out and the
    parameter groups treat it as an inner module's o_proj."""

    def __init__(self, hidden: int, width: int, output_projection: str):
        super().__init__()
        self.up = nn.Linear(hidden, width)
        self.output_projection = output_projection
        setattr(self, output_projection, nn.Linear(width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.output_projection)(nn.functional.gelu(self.up(x)))


class NexusQwen2Attention(NexusAttentionMixin, Qwen2Attention):
    base_attention_class = Qwen2Attention


class NexusLlamaAttention(NexusAttentionMixin, LlamaAttention):
    base_attention_class = LlamaAttention


class NexusMistralAttention(NexusAttentionMixin, MistralAttention):
    base_attention_class = MistralAttention


class NexusQwen3Attention(NexusAttentionMixin, Qwen3Attention):
    base_attention_class = Qwen3Attention


class NexusGPTNeoXAttention(NexusAttentionMixin, GPTNeoXAttention):
    """GPT-NeoX (Pythia): one fused `query_key_value` with each head's q, k, v rows together, `dense` as
    the output projection, partial rotary (its `apply_rotary_pos_emb`), biases, no GQA; the cache
    arrives as `layer_past`."""

    base_attention_class = GPTNeoXAttention
    output_projection = "dense"
    num_key_value_groups = 1  # what the attention kernels read; GPT-NeoX has a KV head per query head

    @property
    def head_dim(self) -> int:
        return self.head_size

    @staticmethod
    def _kv_heads(config: transformers.PretrainedConfig) -> int:
        return config.num_attention_heads

    def _project(self, modules: list[nn.Module], p: str, x: torch.Tensor) -> torch.Tensor:
        return project_interleaved(modules, p, x, self.head_dim)

    def _project_all(self, modules: list[nn.Module], x: torch.Tensor) -> _Heads:
        return project_all_interleaved(modules, x, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layer_past: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if layer_past is not None and kwargs.get("cache") not in (None, layer_past):
            raise ValueError("Nexus attention got two different caches under layer_past and cache; pass one.")
        kwargs["cache"] = layer_past if layer_past is not None else kwargs.get("cache")
        return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)


# ----------------------------------------------------------------------------------- models
class _NexusModelMixin:
    """The family's model with every decoder layer's attention a Nexus attention.

    Subclass, don't fork: the family's __init__ builds its decoder layers and ends in `post_init`, so
    that is where the Nexus attention goes in, once, before any weight is initialised (under
    from_pretrained the stock attention it replaces was only ever built on the meta device). After the
    init pass, gates and a zero_out o_proj get their start values.
    """

    nexus_attention_class: type[nn.Module]
    attention_attribute = "self_attn"  # a decoder layer's attention module (GPT-NeoX: `attention`)
    # A static cache is refused (the inner levels' slots are appended to a dynamic cache), so the
    # fullgraph-compiled generation path that transformers takes when this is True cannot run.
    _can_compile_fullgraph = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, refusing a checkpoint whose Nexus tensors do not match its
        `nexus` block (`check_nexus_tensors`): transformers would initialise a missing one at random
        (different logits on every load) and drop an unexpected one, without an error."""
        want_info = kwargs.pop("output_loading_info", False)
        if "use_kernels" not in kwargs and "USE_HUB_KERNELS" not in os.environ and kernels_unavailable():
            warnings.warn(_KERNELS_NOTICE.format(version=transformers.__version__), stacklevel=2)
            kwargs["use_kernels"] = False  # a load that works, rather than one that cannot
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        check_nexus_tensors(model, info, source)
        return (model, info) if want_info else model

    def post_init(self) -> None:
        decoder = getattr(self, self.base_model_prefix, self)  # *ForCausalLM: .model (GPT-NeoX: .gpt_neox)
        name = self.attention_attribute
        if any(isinstance(getattr(layer, name), NexusAttentionMixin) for layer in decoder.layers):
            super().post_init()  # called again later (not by the family): never rebuild or re-start
            return
        for i, layer in enumerate(decoder.layers):
            setattr(layer, name, self.nexus_attention_class(self.config, i))
        super().post_init()
        _start_nexus_parameters(self)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, NexusAttentionMixin):
            init_nexus_parameters(module)

    def initialize_weights(self) -> None:
        """transformers' init pass, then the Nexus start values (gates, zero_out o_proj) for every Nexus
        attention not started yet. The pass alone cannot be trusted with them: in a *ForCausalLM it runs
        the inner `Model` with the family's own `_init_weights`, which knows no gates, and for a class
        outside transformers ("custom code", as these are) it marks a module initialised when all its
        direct parameters are: a Nexus attention has none, so its `_init_weights` never ran."""
        super().initialize_weights()
        _start_nexus_parameters(self)


def _start_tensors(attention: NexusAttentionMixin) -> list[torch.Tensor]:
    """The tensors `init_nexus_parameters` sets: gates, and with zero_out every inner o_proj."""
    tensors = list(getattr(attention, "gates", {}).values())
    if attention.nexus.inner_init == "zero_out" and hasattr(attention, "inner"):
        for inner in attention.inner.values():
            out = getattr(inner, attention.output_projection)
            tensors += [t for t in (out.weight, out.bias) if t is not None]
    return tensors


@torch.no_grad()
def _start_nexus_parameters(model: nn.Module) -> None:
    """Put every gate (and zero_out o_proj) of `model` at its start value, once per attention and not
    on the meta device (a from_pretrained model starts there: its start comes after loading). A tensor
    loaded from a checkpoint keeps its value (transformers marks it `_is_hf_initialized`, which the
    `transformers.initialization` functions respect)."""
    for module in model.modules():
        if isinstance(module, NexusAttentionMixin) and not getattr(module, "_nexus_started", False):
            if not any(t.is_meta for t in _start_tensors(module)):
                init_nexus_parameters(module)


def init_nexus_parameters(attention: NexusAttentionMixin) -> None:
    """Gates to NexusConfig.gate_start; with inner_init="zero_out", every inner o_proj to 0. Marks the
    attention started (a later init pass leaves it alone, as transformers leaves initialised modules)."""
    nexus = attention.nexus
    for gate in getattr(attention, "gates", {}).values():
        init.constant_(gate, nexus.gate_start)
    if nexus.inner_init == "zero_out" and hasattr(attention, "inner"):  # order 1 has none
        for inner in attention.inner.values():
            out = getattr(inner, attention.output_projection)
            init.zeros_(out.weight)
            if out.bias is not None:
                init.zeros_(out.bias)
    attention._nexus_started = not any(t.is_meta for t in _start_tensors(attention))


# ------------------------------------------------------------------------- checkpoint integrity
# The attributes under which a Nexus attention holds what a conversion adds (state-dict names
# `...self_attn.inner.<p>.*` and `...self_attn.gates.<p>`, GPT-NeoX `...attention.inner.<p>.*`;
# nexus_retrofit.modeling.names reads the same).
NEXUS_SUBMODULES = ("inner", "gates")
ATTENTION_ATTRIBUTES = ("self_attn", "attention")
_SHOWN = 3  # tensor names an error message lists before "... (N in all)"


class NexusCheckpointError(ValueError):
    """A Nexus checkpoint whose Nexus tensors do not match its config's `nexus` block."""


def _is_nexus_key(name: str) -> bool:
    parts = name.split(".")
    return any(a in ATTENTION_ATTRIBUTES and b in NEXUS_SUBMODULES for a, b in zip(parts, parts[1:]))


def _own_nexus_names(attention: nn.Module) -> list[str]:
    """The Nexus tensors of one attention, relative names (`inner.q.o_proj.weight`, `gates.q`)."""
    return [
        f"{sub}.{name}"
        for sub in NEXUS_SUBMODULES
        if hasattr(attention, sub)
        for name in getattr(attention, sub).state_dict()
    ]


def nexus_tensor_names(model_or_config: nn.Module | transformers.PretrainedConfig) -> list[str]:
    """The state-dict names of the Nexus tensors (inner modules, gates) that a Nexus model holds, or
    that a Nexus config's `nexus` block implies (named as a *ForCausalLM checkpoint names them), in
    layer order. Order 1, or inner="shared"/"self" with gate="none", implies none."""
    if isinstance(model_or_config, nn.Module):
        return [
            f"{prefix}.{name}"
            for prefix, module in model_or_config.named_modules()
            if isinstance(module, NexusAttentionMixin)
            for name in _own_nexus_names(module)
        ]
    config = model_or_config
    lm_cls = _CAUSAL_LM_CLASSES.get(config.model_type)
    if lm_cls is None:
        raise ValueError(
            f"model_type {config.model_type!r} is not a Nexus model type ({', '.join(_CAUSAL_LM_CLASSES)})"
        )
    with torch.device("meta"):  # shapes only: nothing is allocated
        own = _own_nexus_names(lm_cls.nexus_attention_class(config, 0))
    layers = f"{lm_cls.base_model_prefix}.layers"
    return [
        f"{layers}.{i}.{lm_cls.attention_attribute}.{name}"
        for i in range(config.num_hidden_layers)
        for name in own
    ]


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_nexus_tensors(model: nn.Module, loading_info: dict, source: object = None) -> None:
    """Refuse (NexusCheckpointError, one line) a loaded checkpoint that lacks a Nexus tensor its
    `nexus` block implies, or holds one the block does not imply. `loading_info` is what
    from_pretrained returns with output_loading_info=True (a tensor with a mismatched shape counts as
    missing: `ignore_mismatched_sizes` re-initialises it). Only Nexus tensors are checked here; base
    tensors follow transformers' own rules (e.g. a tied lm_head)."""
    absent = set(loading_info.get("missing_keys", ()))
    absent |= {k[0] if isinstance(k, tuple) else k for k in loading_info.get("mismatched_keys", ())}
    expected = nexus_tensor_names(model)
    missing = [name for name in expected if name in absent]
    unexpected = sorted(name for name in loading_info.get("unexpected_keys", ()) if _is_nexus_key(name))
    if not missing and not unexpected:
        return
    nexus = model.config.nexus_config
    block = f"order={nexus.order}, projections={''.join(nexus.projections)}, inner={nexus.inner}, gate={nexus.gate}"
    where = source if source is not None else "the checkpoint"
    if len(missing) == len(expected) and not unexpected:
        raise NexusCheckpointError(
            f"{where} holds none of the {len(expected)} Nexus tensors (inner attentions, gates) that its "
            f"nexus block ({block}) implies: it is a base checkpoint, and {type(model).__name__} would start "
            "them all at random. Build a Nexus model from a base checkpoint with `nexus-retrofit convert "
            "SOURCE OUTPUT` (or nexus_retrofit.convert(model, NexusConfig(...)))"
        )
    found = []
    if missing:
        found.append(
            f"lacks {len(missing)} Nexus tensor(s) that the nexus block implies ({_listed(missing)})"
        )
    if unexpected:
        found.append(
            f"holds {len(unexpected)} Nexus tensor(s) that it does not imply ({_listed(unexpected)})"
        )
    raise NexusCheckpointError(
        f"{where} does not match its config's nexus block ({block}): it {' and '.join(found)}. Re-convert "
        "the source model with `nexus-retrofit convert`, or fix the nexus block in config.json to match the weights"
    )


class NexusQwen2Model(_NexusModelMixin, Qwen2Model):
    config_class = NexusQwen2Config
    nexus_attention_class = NexusQwen2Attention


class NexusQwen2ForCausalLM(_NexusModelMixin, Qwen2ForCausalLM):
    config_class = NexusQwen2Config
    nexus_attention_class = NexusQwen2Attention


class NexusLlamaModel(_NexusModelMixin, LlamaModel):
    config_class = NexusLlamaConfig
    nexus_attention_class = NexusLlamaAttention


class NexusLlamaForCausalLM(_NexusModelMixin, LlamaForCausalLM):
    config_class = NexusLlamaConfig
    nexus_attention_class = NexusLlamaAttention


class NexusMistralModel(_NexusModelMixin, MistralModel):
    config_class = NexusMistralConfig
    nexus_attention_class = NexusMistralAttention


class NexusMistralForCausalLM(_NexusModelMixin, MistralForCausalLM):
    config_class = NexusMistralConfig
    nexus_attention_class = NexusMistralAttention


class NexusQwen3Model(_NexusModelMixin, Qwen3Model):
    config_class = NexusQwen3Config
    nexus_attention_class = NexusQwen3Attention


class NexusQwen3ForCausalLM(_NexusModelMixin, Qwen3ForCausalLM):
    config_class = NexusQwen3Config
    nexus_attention_class = NexusQwen3Attention


class NexusGPTNeoXModel(_NexusModelMixin, GPTNeoXModel):
    config_class = NexusGPTNeoXConfig
    nexus_attention_class = NexusGPTNeoXAttention
    attention_attribute = "attention"


class NexusGPTNeoXForCausalLM(_NexusModelMixin, GPTNeoXForCausalLM):
    config_class = NexusGPTNeoXConfig
    nexus_attention_class = NexusGPTNeoXAttention
    attention_attribute = "attention"


_CAUSAL_LM_CLASSES = {
    cls.config_class.model_type: cls
    for cls in (
        NexusQwen2ForCausalLM,
        NexusLlamaForCausalLM,
        NexusMistralForCausalLM,
        NexusQwen3ForCausalLM,
        NexusGPTNeoXForCausalLM,
    )
}


def _inherit_checkpoint_names(cls: type) -> None:
    """Give a Nexus class its family's checkpoint renames (GPT-NeoX: Pythia's `embed_out` is the
    `lm_head`), so it saves and loads the names a base checkpoint of the family has and streaming
    conversion and vLLM read them as such. transformers looks renames up by class name and skips custom
    classes unless registered, so without this a Nexus GPT-NeoX would save `lm_head.weight`."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    family_cls = next(c for c in cls.__mro__[1:] if c.__module__.startswith("transformers.models."))
    renames = get_checkpoint_conversion_mapping(family_cls.__name__)
    if renames:
        register_checkpoint_conversion_mapping(cls.__name__, renames, overwrite=True)


# save_pretrained copies this file (and configuration_nexus.py, which it imports) next to the weights.
for _cls in _CAUSAL_LM_CLASSES.values():
    _cls.register_for_auto_class("AutoModelForCausalLM")
    _inherit_checkpoint_names(_cls)

__all__ = [
    "NexusAttentionMixin",
    "NexusCheckpointError",
    "check_nexus_tensors",
    "init_nexus_parameters",
    "nexus_tensor_names",
    "NexusQwen2Model",
    "NexusQwen2ForCausalLM",
    "NexusLlamaModel",
    "NexusLlamaForCausalLM",
    "NexusMistralModel",
    "NexusMistralForCausalLM",
    "NexusQwen3Model",
    "NexusQwen3ForCausalLM",
    "NexusGPTNeoXModel",
    "NexusGPTNeoXForCausalLM",
]
