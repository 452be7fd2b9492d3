"""A small Nexus attention layer for CPU experiments, over the one Nexus core (modeling/nexus_core.py).

The experiments fit one attention map or train tiny transformers from scratch, so they use this
small module instead of a full HF model. It is not an implementation of Nexus: the level loops, the
gate and what each reading decides are `nexus_core`'s, the same code the transformers and vLLM models
run; this layer supplies plain-PyTorch projections and attention, without what these tasks do not need:
RoPE (the tasks carry no positional signal), GQA (one KV head per head) and the KV cache. A test
checks it against `NexusQwen2Attention` with RoPE at position 0 and zero q/k/v biases. Notation
(docs/DESIGN.md §1, paper arXiv 2512.03377):

    standard : Q = X Wq, K = X Wk, V = X Wv, O = softmax(Q K^T s + M) V Wo
    separate : X_p^(l) = X + g_p * Inner_p(X_q^(l-1), X_k^(l-1), X_v^(l-1))   (Sec. 4.4, Eq. 10-11)
    shared   : the same, Inner_p = the layer's own attention for every p      (Eq. 12)
    self     : P^(l) = P + g_p * softmax(P^(l-1) P^(l-1)^T s + M) P^(l-1)     (Eq. 7-8, per head)
    mlp      : X_p = X + g_p * MLP_p(X)   -- control: nonlinear, token-wise, NOT context-mixing

`mlp` is not in the paper: it is the parameter-matched control that separates "Q/K are nonlinear
in X" (what Theorem 3.1 needs) from "Q/K mix in context" (what Nexus adds). Gates start at zero
(the toolkit's function-preserving default), so every variant starts as standard attention.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..modeling.nexus_core import Dims, GateSpec, inner_outputs, reading, refine_heads, refine_inputs

VARIANTS = ("standard", "separate", "shared", "self", "mlp")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """Which attention a layer uses.

    variant: one of VARIANTS. projections: which of q, k, v are refined (Table 2: "q", "qk",
    "qkv"). order: Nexus order m >= 2 (Eq. 10-11; inner weights and gates shared across levels).
    mlp_hidden: hidden width of each token-wise MLP of the `mlp` control (None: match `separate`).
    """

    variant: str = "standard"
    projections: str = "qk"
    order: int = 2
    mlp_hidden: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {VARIANTS}")
        if (
            not self.projections
            or set(self.projections) - set("qkv")
            or len(set(self.projections)) != len(self.projections)
        ):
            raise ValueError(f"projections must be distinct letters from 'qkv', got {self.projections!r}")
        if self.order < 2 and self.variant in ("separate", "shared", "self"):
            raise ValueError(f"a Nexus variant needs order >= 2, got {self.order}")

    @property
    def label(self) -> str:
        if self.variant == "standard":
            return "standard"
        proj = self.projections.upper()
        if self.variant == "mlp":
            return f"mlp-{proj} (control)"
        order = f", m={self.order}" if self.order != 2 else ""
        return f"nexus-{proj} {self.variant}{order}"


# The variants every experiment compares: standard attention, the token-wise control, the three
# Nexus readings (all refining Q and K).
QK_VARIANTS: dict[str, MixerSpec] = {
    "standard": MixerSpec("standard"),
    "mlp": MixerSpec("mlp", "qk"),
    "separate": MixerSpec("separate", "qk"),
    "shared": MixerSpec("shared", "qk"),
    "self": MixerSpec("self", "qk"),
}


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d) + M) v on (B, h, n, d); returns (output (B, h, n, d), probs (B, h, n, n))."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, n, n)
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    probs = logits.softmax(dim=-1)
    return probs @ v, probs


class HeadAttention(nn.Module):
    """Multi-head attention with q/k/v/o projections and no biases; inputs of Q, K and V may differ."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, causal: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = n_heads, head_dim, causal
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, h*d) -> (B, h, n, d)."""
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim).transpose(-2, -3)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, n, d) -> (B, n, h*d)."""
        return x.transpose(-2, -3).reshape(*x.shape[:-3], x.shape[-2], -1)

    def heads(
        self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V heads (B, h, n, d)."""
        return self.split(self.q_proj(xq)), self.split(self.k_proj(xk)), self.split(self.v_proj(xv))

    def forward(
        self, xq: torch.Tensor, xk: torch.Tensor | None = None, xv: torch.Tensor | None = None
    ) -> torch.Tensor:
        xk = xq if xk is None else xk
        xv = xq if xv is None else xv
        out, _ = attend(*self.heads(xq, xk, xv), self.causal)
        return self.o_proj(self.merge(out))  # (B, n, dim)


def matched_mlp_hidden(dim: int, n_heads: int, head_dim: int) -> int:
    """Hidden width of a dim->h->dim MLP (with biases) whose size is closest to one inner attention."""
    target = 4 * dim * n_heads * head_dim  # q, k, v, o of one HeadAttention
    return max(1, round((target - dim) / (2 * dim + 1)))


GATES = GateSpec("zero", "channel", "identity")  # the experiments' gates: per channel, from zero


class NexusMixer(nn.Module):
    """One attention layer: standard, Nexus (separate/shared/self) or the token-wise `mlp` control."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, spec: MixerSpec, causal: bool = True):
        super().__init__()
        self.spec = spec
        self.attn = HeadAttention(dim, n_heads, head_dim, causal)
        self.reading = reading(spec.variant) if spec.variant != "standard" else None
        ps = spec.projections
        if spec.variant == "separate":
            self.inner = nn.ModuleDict({p: HeadAttention(dim, n_heads, head_dim, causal) for p in ps})
        elif spec.variant == "mlp":
            hidden = spec.mlp_hidden or matched_mlp_hidden(dim, n_heads, head_dim)
            self.inner = nn.ModuleDict(
                {p: nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for p in ps}
            )
        if self.reading is not None:
            dims = Dims(dim, n_heads, n_heads, head_dim)
            self.gates = nn.ParameterDict(
                {p: nn.Parameter(torch.zeros(self.reading.gate_width(p, GATES, dims))) for p in ps}
            )

    # ------------------------------------------------------------------------------- refinement
    def _inner(self, level: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{p: Inner_p} at one level: the inner modules' (or, shared, the layer's own) attention."""
        if self.spec.variant == "mlp":  # token-wise, on X: no attention
            return {p: self.inner[p](inputs[p]) for p in self.spec.projections}
        shared = self.reading.one_pass
        passes: dict[str | None, torch.Tensor] = {}

        def heads_of(p: str) -> torch.Tensor:
            key = None if shared else p
            if key not in passes:
                module = self.attn if shared else self.inner[p]
                out, _ = attend(*module.heads(inputs["q"], inputs["k"], inputs["v"]), module.causal)
                passes[key] = module.merge(out)  # (B, n, h*d)
            return passes[key]

        return inner_outputs(
            self.reading, self.spec.projections, self.gates, GATES, self.attn.head_dim, heads_of,
            lambda p, heads: (self.attn if shared else self.inner[p]).o_proj(heads),
        )  # fmt: skip

    def _refined_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{p: X_p} for separate / shared / mlp (nexus_core.refine_inputs); unrefined projections keep X."""
        order = 2 if self.spec.variant == "mlp" else self.spec.order  # the control is one token-wise step
        return refine_inputs(
            x, self.reading, self.spec.projections, order, self.gates, GATES, self.attn.head_dim, self._inner
        )

    def _refined_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`self` (Eq. 7-8, nexus_core.refine_heads): P^(l) = P + g_p * softmax(P^(l-1) P^(l-1)^T s + M) P^(l-1)."""
        attn = self.attn
        base = {p: attn.merge(h) for p, h in zip("qkv", attn.heads(x, x, x))}  # (B, n, h*d)

        def attend_self(level: int, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for p in self.spec.projections:
                z = attn.split(heads[p])
                out[p] = attn.merge(attend(z, z, z, attn.causal)[0])
            return out

        heads = refine_heads(
            base,
            self.reading,
            self.spec.projections,
            self.spec.order,
            self.gates,
            GATES,
            attn.head_dim,
            attend_self,
        )
        return attn.split(heads["q"]), attn.split(heads["k"]), attn.split(heads["v"])

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The outer attention's Q, K, V heads (B, h, n, d) for input x (B, n, dim)."""
        if self.spec.variant == "self":
            return self._refined_heads(x)
        inputs = self._refined_inputs(x) if self.spec.variant != "standard" else {"q": x, "k": x, "v": x}
        return self.attn.heads(inputs["q"], inputs["k"], inputs["v"])

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The outer attention map softmax(Q K^T s + M), (B, h, n, n)."""
        q, k, v = self.qkv(x)
        return attend(q, k, v, self.attn.causal)[1]

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Q K^T s before the mask, (B, h, n, n): what the expressivity fit compares to log A."""
        q, k, _ = self.qkv(x)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = attend(*self.qkv(x), self.attn.causal)
        return self.attn.o_proj(self.attn.merge(out))  # (B, n, dim)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
