"""Configuration of Nexus higher-order attention (arXiv 2512.03377) and the Nexus model configs.

This file is copied into every converted checkpoint (`auto_map`), so it imports nothing but
transformers and the standard library: a checkpoint must load where nexus_retrofit is not installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import transformers

# The transformers releases this file and modeling_nexus.py are tested on (CI's oldest and newest
# environments). Recorded in every checkpoint's config as `nexus_tested_transformers`.
TESTED_TRANSFORMERS = ("5.16.1", "5.25.0")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '5.24.0' or '5.25.0.dev0'."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


if _release(transformers.__version__) < _release(TESTED_TRANSFORMERS[0]):
    raise ImportError(
        f"This Nexus checkpoint needs transformers>={TESTED_TRANSFORMERS[0]} (found {transformers.__version__}): "
        f"pip install -U 'transformers>={TESTED_TRANSFORMERS[0]}'"
    )

from huggingface_hub.dataclasses import strict  # noqa: E402
from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

# Order m costs 1 + (m-1)|P| attention calls per layer (and as many KV-cache slots); nothing above
# MAX_ORDER is tested. Order 1 is standard attention (a Nexus checkpoint that adds nothing).
MAX_ORDER = 4
PROJECTIONS = ("q", "k", "v")
# "mlp" is not the paper's: the token-wise control (X_p = X + f(g_p) * MLP_p(X), one level), nonlinear
# in X but mixing no context, so an experiment can tell "Q/K are nonlinear in X" from "Q/K mix context".
INNER_KINDS = ("separate", "shared", "self", "mlp")
GATE_KINDS = ("zero", "open", "none")
INNER_INITS = ("random", "copy", "zero_out")
GATE_SHAPES = ("channel", "head", "scalar")
GATE_FUNCTIONS = ("identity", "tanh")
# Measured default (eval/results/experiments/retrofit/README.md): the gate a conversion gets for each
# inner kind when `gate` is not given.
DEFAULT_GATE = {"separate": "open", "shared": "zero", "self": "zero", "mlp": "zero"}
# The value of each setting added after the first release, for a saved `nexus` block that predates
# it: such a checkpoint loads exactly as it did (per-channel raw gates).
LEGACY_SETTINGS: dict[str, Any] = {"gate_shape": "channel", "gate_fn": "identity"}
# Training settings that older releases stored in the `nexus` block: not architecture, so not part of
# NexusConfig; a saved block holding one still loads (the trainer reads it as the recipe's default).
LEGACY_TRAINING_SETTINGS = ("gate_lr_multiplier",)


def _parse_projections(value: Any) -> tuple[str, ...]:
    """Accept ("q", "k"), ["k", "q"], "qk" or "q,k"; return them in canonical q, k, v order."""
    if isinstance(value, str):
        items = [c for c in value.replace(",", "").replace(" ", "").lower()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(c).lower() for c in value]
    else:
        raise ValueError(f"NexusConfig.projections must be a subset of {PROJECTIONS}, got {value!r}")
    unknown = sorted(set(items) - set(PROJECTIONS))
    if unknown or not items or len(set(items)) != len(items):
        raise ValueError(
            f"NexusConfig.projections must be a non-empty set of distinct values from {PROJECTIONS} "
            f"(e.g. 'qk' or ('q', 'k')), got {value!r}"
        )
    return tuple(p for p in PROJECTIONS if p in items)


def _resolve_defaults(c: NexusConfig) -> None:
    """Fill the settings left at None/"auto" with the measured defaults (always function-preserving)."""
    if c.gate is None:
        open_ok = c.inner == "separate" and c.inner_init in (None, "zero_out")
        object.__setattr__(c, "gate", DEFAULT_GATE[c.inner] if open_ok else "zero")
    if c.inner_init is None:
        zero_out = c.gate == "open" and c.inner == "separate"
        object.__setattr__(c, "inner_init", "zero_out" if zero_out else "random")


def _check_combination(c: NexusConfig) -> None:
    """Refuse settings that contradict each other, one line each."""
    if c.inner_init in ("copy", "zero_out") and c.inner != "separate":
        raise ValueError(
            f"NexusConfig.inner_init={c.inner_init!r} only applies to inner='separate' (it initialises the new "
            f"inner attention modules); inner={c.inner!r} has none: use inner_init='random'"
        )
    if c.inner_init == "zero_out" and c.gate != "open":
        why = "the path would stay 0 and never train" if c.gate == "zero" else "X_p would be 0"
        raise ValueError(f"NexusConfig.inner_init='zero_out' needs gate='open' (with gate={c.gate!r} {why})")
    if c.inner == "mlp" and c.gate_shape == "head":
        raise ValueError(
            "NexusConfig.inner='mlp' has no inner heads to gate: use gate_shape 'channel' or 'scalar'"
        )
    if c.inner == "mlp" and c.order > 2:
        raise ValueError(
            f"NexusConfig.inner='mlp' (the token-wise control) has one level: order must be 1 or 2, got {c.order}"
        )
    if c.gate == "open" and c.inner != "separate":
        raise ValueError(
            f"NexusConfig.gate='open' needs inner='separate': inner={c.inner!r} has no inner o_proj to start at 0, "
            "so an open gate would change the converted model's function; use gate='zero' (or 'none')"
        )


@dataclasses.dataclass(frozen=True)
class NexusConfig:
    """Settings of a Nexus retrofit. See docs/DESIGN.md §1 and §5.

    order: 1 is standard attention; order m feeds the Q/K(/V) projections with order m-1 inner
        attentions (Eq. 10-11), inner weights and gates shared across levels.
    projections: which projection inputs are refined (Table 2: "q", "qk", "qkv").
    inner: "separate" (own attention module per refined projection, Sec. 4.4), "shared" (the layer's
        own attention, Eq. 12) or "self" (parameter-free per-head self-attention on Q/K, Eq. 7-8); "mlp"
        is a control, not the paper's: X_p = X + f(g_p) * MLP_p(X), one token-wise MLP per refined
        projection (order 2), sized like one inner attention. vLLM does not serve it.
    gate: the gated residual X_p = X + f(g_p) * Inner_p(X) (beyond the paper), with the raw gate g_p
        starting at 0 ("zero": function-preserving, but the inner modules get no gradient until g_p
        moves) or at 1 ("open": the path starts on; exactly function-preserving only with
        inner_init="zero_out"); "none" is the paper's X_p = Inner_p(X).
    inner_init: "random" (paper), "copy" (inner modules start as copies of the layer's attention) or
        "zero_out" (random, with the inner o_proj at 0: with gate="open" the converted model computes
        the source model's function exactly and o_proj's gradient is first-order non-zero, like LoRA's
        B = 0). "copy" and "zero_out" need inner="separate" (the only kind with inner modules).
    gate_shape: one gate value per "channel" (hidden size; per head dimension for inner="self"), per
        inner attention "head" (scales the inner heads before the inner o_proj), or one "scalar".
    gate_fn: f, "identity" or "tanh" (a bounded gate, |f(g)| < 1).

    Architecture only: how the new parameters train (their learning rates, a warm-up) is the recipe's
    `nexus:` block (nexus_retrofit.train.recipe.NexusTrainArguments).
    """

    order: int = 2
    projections: tuple[str, ...] = ("q", "k")
    inner: str = "separate"
    gate: str | None = None  # None: DEFAULT_GATE[inner] (or "zero" when inner_init is random/copy)
    inner_init: str | None = None  # None: "zero_out" with an open gate, else "random"
    gate_shape: str = "channel"
    gate_fn: str = "identity"

    def __post_init__(self) -> None:
        if (
            isinstance(self.order, bool)
            or not isinstance(self.order, int)
            or not 1 <= self.order <= MAX_ORDER
        ):
            raise ValueError(
                f"NexusConfig.order must be an integer from 1 to {MAX_ORDER} (1 = standard attention; above "
                f"{MAX_ORDER} is not supported), got {self.order!r}"
            )
        object.__setattr__(self, "projections", _parse_projections(self.projections))
        _resolve_defaults(self)
        choices = (
            ("inner", INNER_KINDS),
            ("gate", GATE_KINDS),
            ("inner_init", INNER_INITS),
            ("gate_shape", GATE_SHAPES),
            ("gate_fn", GATE_FUNCTIONS),
        )
        for field, allowed in choices:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"NexusConfig.{field} must be one of {allowed}, got {value!r}")
        _check_combination(self)

    @property
    def gate_start(self) -> float:
        """The raw gates' value at conversion (before gate_fn)."""
        return 1.0 if self.gate == "open" else 0.0

    @property
    def function_preserving(self) -> bool:
        """True when the converted model computes exactly the source model's function."""
        return self.gate == "zero" or (self.gate == "open" and self.inner_init == "zero_out")

    @property
    def levels(self) -> int:
        """Number of inner levels below the outer attention (order - 1)."""
        return self.order - 1

    @property
    def distinct_attention_calls(self) -> int:
        """Distinct attention calls per layer: the paper's 2^m - 1 tree collapses to a chain (docs/DESIGN.md §1)."""
        per_level = {"shared": 1, "mlp": 0}.get(self.inner, len(self.projections))
        return 1 + per_level * self.levels

    @property
    def paper_attention_calls(self) -> int:
        """Attention calls per layer as the paper counts them (Eq. 13)."""
        return 2**self.order - 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["projections"] = list(self.projections)
        return d

    @classmethod
    def from_saved(cls, data: dict[str, Any] | None) -> NexusConfig:
        """The settings of a saved `nexus` block; a setting it predates takes LEGACY_SETTINGS' value."""
        data = dict(data or {})
        if data:
            data = {**LEGACY_SETTINGS, **data}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NexusConfig:
        data = {k: v for k, v in (data or {}).items() if k not in LEGACY_TRAINING_SETTINGS}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            allowed = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"unknown Nexus setting(s) {unknown}; allowed: {allowed}")
        return cls(**data)


def _auto_map(family: str) -> dict[str, str]:
    return {
        "AutoConfig": f"configuration_nexus.Nexus{family}Config",
        "AutoModel": f"modeling_nexus.Nexus{family}Model",
        "AutoModelForCausalLM": f"modeling_nexus.Nexus{family}ForCausalLM",
    }


@dataclasses.dataclass(kw_only=True, repr=False, eq=False)
class _NexusConfigMixin:
    """The fields every Nexus config adds to its family's; validates the `nexus` block and points
    `auto_map` at the bundled modeling code. A dataclass, so each family's config (a dataclass by
    transformers' `__init_subclass__`) takes these fields from it."""

    nexus_family: ClassVar[str]
    nexus: dict | None = None  # the NexusConfig settings, as a plain dict (config.json)
    base_model: str | None = None  # what it was converted from (Hub id or path), for model cards
    nexus_tested_transformers: str | None = None  # set on every save: see TESTED_TRANSFORMERS

    def __post_init__(self, **kwargs):
        self.nexus = NexusConfig.from_saved(self.nexus).to_dict()
        # The range of the modeling code that runs (and that save_pretrained bundles); the writer's
        # own release is transformers' `transformers_version` field.
        self.nexus_tested_transformers = f">={TESTED_TRANSFORMERS[0]},<={TESTED_TRANSFORMERS[1]}"
        if not getattr(self, "auto_map", None):
            self.auto_map = _auto_map(self.nexus_family)
        super().__post_init__(**kwargs)

    @property
    def nexus_config(self) -> NexusConfig:
        return NexusConfig.from_dict(self.nexus)


@strict
class NexusQwen2Config(_NexusConfigMixin, Qwen2Config):
    model_type = "nexus_qwen2"
    nexus_family = "Qwen2"


@strict
class NexusLlamaConfig(_NexusConfigMixin, LlamaConfig):
    model_type = "nexus_llama"
    nexus_family = "Llama"


@strict
class NexusMistralConfig(_NexusConfigMixin, MistralConfig):
    model_type = "nexus_mistral"
    nexus_family = "Mistral"


@strict
class NexusQwen3Config(_NexusConfigMixin, Qwen3Config):
    model_type = "nexus_qwen3"
    nexus_family = "Qwen3"


@strict
class NexusGPTNeoXConfig(_NexusConfigMixin, GPTNeoXConfig):
    """GPT-NeoX / Pythia: fused per-head `query_key_value`, `dense`, partial rotary, LayerNorm, biases,
    parallel or sequential residual (all the family's own; the Nexus attention handles the first three)."""

    model_type = "nexus_gpt_neox"
    nexus_family = "GPTNeoX"


for _cls in (NexusQwen2Config, NexusLlamaConfig, NexusMistralConfig, NexusQwen3Config, NexusGPTNeoXConfig):
    _cls.register_for_auto_class("AutoConfig")

__all__ = [
    "MAX_ORDER",
    "TESTED_TRANSFORMERS",
    "NexusConfig",
    "NexusQwen2Config",
    "NexusLlamaConfig",
    "NexusMistralConfig",
    "NexusQwen3Config",
    "NexusGPTNeoXConfig",
]
