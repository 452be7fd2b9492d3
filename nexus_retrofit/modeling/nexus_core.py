"""The Nexus recursion, written once (arXiv 2512.03377): the maths over plain tensors and callables.

Three wrappers run it, each with its own way to project, attend and apply an output projection:
transformers (`modeling_nexus.py`: dispatch, KV cache, fused projections), vLLM
(`nexus_retrofit/vllm/attention.py`: paged `Attention` layers, flat token layout) and the experiments'
small layer (`nexus_retrofit/experiments/layers.py`). What the *reading* decides lives here, in one
object per reading (`READINGS`); the level loops and the gate are the functions below.

Notation (docs/DESIGN.md §1): X the layer input after the input norm, P the refined projections, m the
order, g_p the raw gate of projection p and f the gate function:

    X_p^(0) = X
    X_p^(l) = X + f(g_p) * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))     l = 1 .. m-1   (Eq. 10-11)
    O       = Attn(X_q^(m-1), X_k^(m-1), X_v^(m-1))                    the layer's own attention

`gate="none"` is the paper's X_p^(l) = Inner_p(...). `shared` (Eq. 12): Inner_p is the layer's own
attention, one pass per level serving every p. `self` (Eq. 7-8) refines the projections' heads, not X:

    P^(0) = P (pre-RoPE heads),   P^(l) = P + f(g_p) * softmax(R(P^(l-1)) R(P^(l-1))^T s + M) P^(l-1)

This file is copied into every converted checkpoint with modeling_nexus.py: it imports only torch.
Tensors' last dimension is always flat (..., width): (B, n, hidden) in transformers, (T, hidden) in
vLLM; a per-head view is taken here where a gate needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Inputs = dict[str, torch.Tensor]  # {p: X_p} (separate/shared/mlp) or {p: P} heads, flat (self)
# Called with (p, what the level refined, its refinement) at every level: how a trainer watches the
# path's strength ||X_p - X|| / ||X|| without the model keeping state for it.
Observer = Callable[[str, torch.Tensor, torch.Tensor], None]


# -------------------------------------------------------------------------------------------- gate
@dataclass(frozen=True)
class GateSpec:
    """How the gates enter: `mode` "none" (the paper's form) or gated ("zero"/"open" only differ at
    the start), `shape` "channel" / "head" / "scalar", `fn` f: "identity" or "tanh"."""

    mode: str = "zero"
    shape: str = "channel"
    fn: str = "identity"

    @property
    def gated(self) -> bool:
        return self.mode != "none"

    @property
    def per_head(self) -> bool:
        return self.gated and self.shape == "head"


def gate_factor(gate: torch.Tensor, spec: GateSpec) -> torch.Tensor:
    """f(g_p): the gate as it multiplies the inner output, flat."""
    return torch.tanh(gate) if spec.fn == "tanh" else gate


def scale_heads(heads: torch.Tensor, factor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head gates: each inner head (..., heads * head_dim) times its f(g), before the inner o_proj."""
    return (heads.unflatten(-1, (-1, head_dim)) * factor[:, None]).flatten(-2)


# ---------------------------------------------------------------------------------------- readings
@dataclass(frozen=True)
class Dims:
    """The sizes a reading needs: hidden size, query and KV heads, head dimension."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    def of(self, p: str) -> int:
        """Heads of projection p (q: query heads; k, v: KV heads)."""
        return self.heads if p == "q" else self.kv_heads


@dataclass(frozen=True)
class SubAttention:
    """One distinct attention call of a layer below the outer one: at `level`, for projection
    `projection` (None: the shared pass serving every projection), with queries and keys/values
    having the head counts of projections `heads` (("q", "k"): the base layer's layout, with GQA)."""

    level: int
    projection: str | None
    heads: tuple[str, str]

    @property
    def name(self) -> str:
        return f"level{self.level}" if self.projection is None else f"{self.projection}_level{self.level}"

    @property
    def label(self) -> str:
        who = "shared inner" if self.projection is None else f"inner-{self.projection}"
        return f"level {self.level}: {who}"


class Reading:
    """What one reading of the paper's inner attention decides (docs/DESIGN.md §1).

    on_heads: refines the projections' heads P (self) rather than the layer input X.
    one_pass: one inner pass per level serves every refined projection (shared, Eq. 12).
    inner_modules: owns inner modules of its own (separate; mlp).
    attends: its inner modules are attentions (mlp: token-wise MLPs, no context mixing).
    """

    name: str
    on_heads = False
    one_pass = False
    inner_modules = False
    attends = True

    def sub_attentions(self, projections: tuple[str, ...], order: int) -> list[SubAttention]:
        """The distinct inner attention calls of a layer, level by level (the cache layout)."""
        return [SubAttention(level, p, ("q", "k")) for level in range(1, order) for p in projections]

    def gate_width(self, p: str, spec: GateSpec, dims: Dims) -> int:
        """Number of values of g_p: per channel of X (hidden size), per inner head, or one."""
        if spec.shape == "scalar":
            return 1
        return dims.heads if spec.shape == "head" else dims.hidden

    def gated(
        self,
        base: torch.Tensor,
        inner: torch.Tensor,
        factor: torch.Tensor | None,
        spec: GateSpec,
        head_dim: int,
    ) -> torch.Tensor:
        """X_p = X + f(g_p) * Inner_p (Eq. 10-11, gated residual), or the paper's X_p = Inner_p."""
        if factor is None or not spec.gated:
            return inner
        if spec.per_head:
            return self.head_gated(base, inner, factor, head_dim)
        return torch.addcmul(base, factor, inner)  # one kernel

    def head_gated(
        self, base: torch.Tensor, inner: torch.Tensor, factor: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """The residual with per-head gates: here they scaled the inner heads before the inner o_proj."""
        return base + inner

    def __repr__(self) -> str:
        return f"<reading {self.name}>"


class Separate(Reading):
    """Sec. 4.4 / Table 2 "Shared: No": one full attention module per refined projection."""

    name = "separate"
    inner_modules = True


class Shared(Reading):
    """Eq. 12 / Table 2 "Shared: Yes": the layer's own attention; one pass per level serves every p."""

    name = "shared"
    one_pass = True

    def sub_attentions(self, projections: tuple[str, ...], order: int) -> list[SubAttention]:
        return [SubAttention(level, None, ("q", "k")) for level in range(1, order)]


class SelfAttention(Reading):
    """Eq. 7-8: parameter-free, per head of each refined projection (no GQA: a q-side call attends
    over every query head, so its cache holds num_attention_heads heads)."""

    name = "self"
    on_heads = True

    def sub_attentions(self, projections: tuple[str, ...], order: int) -> list[SubAttention]:
        return [SubAttention(level, p, (p, p)) for level in range(1, order) for p in projections]

    def gate_width(self, p: str, spec: GateSpec, dims: Dims) -> int:
        if spec.shape == "scalar":
            return 1
        return dims.of(p) * (dims.head_dim if spec.shape == "channel" else 1)

    def head_gated(
        self, base: torch.Tensor, inner: torch.Tensor, factor: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """One value per head of p, over its head_dim (the heads are the refined tensor itself)."""
        heads = (-1, head_dim)
        return torch.addcmul(base.unflatten(-1, heads), factor[:, None], inner.unflatten(-1, heads)).flatten(
            -2
        )


class TokenMLP(Reading):
    """The experiments' control (not in the paper): X_p = X + g_p * MLP_p(X), nonlinear in X but
    token-wise, so it separates "Q/K are nonlinear in X" from "Q/K mix in context". One level."""

    name = "mlp"
    inner_modules = True
    attends = False

    def sub_attentions(self, projections: tuple[str, ...], order: int) -> list[SubAttention]:
        return []  # no attention: nothing to cache


READINGS: dict[str, Reading] = {r.name: r for r in (Separate(), Shared(), SelfAttention(), TokenMLP())}


def reading(name: str) -> Reading:
    try:
        return READINGS[name]
    except KeyError:
        raise ValueError(f"unknown Nexus reading {name!r}; choose from {tuple(READINGS)}") from None


# ----------------------------------------------------------------------------------- the recursion
def refine_inputs(
    x: torch.Tensor,
    read: Reading,
    projections: tuple[str, ...],
    order: int,
    gates: Mapping[str, torch.Tensor] | None,
    spec: GateSpec,
    head_dim: int,
    inner: Callable[[int, Inputs], Inputs],
    observe: Observer | None = None,
) -> Inputs:
    """{p: X_p^(m-1)} for the outer attention (Eq. 10-11): level by level, every refined input becomes
    X + f(g_p) * Inner_p(inputs of the level below); an unrefined projection keeps X.

    `inner(level, inputs)` returns {p: Inner_p(X_q, X_k, X_v)} (hidden size) for the level: the
    wrapper's attention, with its cache slot for that level. Inner weights and gates are the same at
    every level, so parameters are O(1) in m.
    """
    x_everywhere = {p: x for p in "qkv"}  # X_p^(0), and the residual's base at every level
    return _levels(x_everywhere, read, projections, order, gates, spec, head_dim, inner, observe)


def refine_heads(
    base: Inputs,
    read: Reading,
    projections: tuple[str, ...],
    order: int,
    gates: Mapping[str, torch.Tensor] | None,
    spec: GateSpec,
    head_dim: int,
    attend_self: Callable[[int, Inputs], Inputs],
    observe: Observer | None = None,
) -> Inputs:
    """{p: P^(m-1)} for the `self` reading (Eq. 7-8): level by level, P + f(g_p) * SelfAttn(P^(l-1)).

    `base` holds the pre-RoPE heads of q, k and v, flat; `attend_self(level, heads)` returns
    {p: softmax(R(P) R(P)^T s + M) P} for the refined projections, flat.
    """
    return _levels(base, read, projections, order, gates, spec, head_dim, attend_self, observe)


def _levels(
    base: Inputs,
    read: Reading,
    projections: tuple[str, ...],
    order: int,
    gates: Mapping[str, torch.Tensor] | None,
    spec: GateSpec,
    head_dim: int,
    refine: Callable[[int, Inputs], Inputs],
    observe: Observer | None,
) -> Inputs:
    """The level loop both readings share: level l gates refine(l, level l-1) onto `base`."""
    current = dict(base)
    factors = _factors(gates, projections, spec)
    for level in range(1, order):
        out = refine(level, current)
        current = {
            **current,
            **{p: read.gated(base[p], out[p], factors[p], spec, head_dim) for p in projections},
        }
        if observe is not None:
            for p in projections:
                observe(p, base[p], current[p])
    return current


def inner_outputs(
    read: Reading,
    projections: tuple[str, ...],
    gates: Mapping[str, torch.Tensor] | None,
    spec: GateSpec,
    head_dim: int,
    heads_of: Callable[[str], torch.Tensor],
    o_proj: Callable[[str, torch.Tensor], torch.Tensor],
) -> Inputs:
    """{p: Inner_p} (hidden size) from one level's attention heads (before the inner o_proj).

    `heads_of(p)` is the attention output that serves p (for `shared`, the one pass); `o_proj(p, h)`
    applies the output projection that belongs to p (the inner module's, or the layer's own). Per-head
    gates scale the heads first; without them one shared pass needs one o_proj for every p (Eq. 12).
    """
    if read.one_pass and not spec.per_head:
        y = o_proj(projections[0], heads_of(projections[0]))
        return dict.fromkeys(projections, y)
    factors = _factors(gates, projections, spec)
    return {
        p: o_proj(p, scale_heads(heads_of(p), factors[p], head_dim) if spec.per_head else heads_of(p))
        for p in projections
    }


def _factors(
    gates: Mapping[str, torch.Tensor] | None, projections: tuple[str, ...], spec: GateSpec
) -> dict[str, torch.Tensor | None]:
    if gates is None or not spec.gated:
        return dict.fromkeys(projections)
    return {p: gate_factor(gates[p], spec) for p in projections}
