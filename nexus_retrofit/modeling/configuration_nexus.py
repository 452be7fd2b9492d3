"""Configuration of Nexus higher-order attention (arXiv 2512.03377) and the Nexus model configs.

This file is copied into every converted checkpoint (`auto_map`), so it imports nothing but
transformers and the standard library: a checkpoint must load where nexus_retrofit is not installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers

# The transformers releases this file and modeling_nexus.py are tested on (CI's oldest and newest
# environments). Recorded in every checkpoint's config as `nexus_tested_transformers`.
TESTED_TRANSFORMERS = ("5.16.1", "5.24.0")


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
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

PROJECTIONS = ("q", "k", "v")
INNER_KINDS = ("separate", "shared", "self")
GATE_KINDS = ("zero", "none")
INNER_INITS = ("random", "copy")


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


@dataclasses.dataclass(frozen=True)
class NexusConfig:
    """Settings of a Nexus retrofit. See DESIGN.md section 1.

    order: 1 is standard attention; order m feeds the Q/K(/V) projections with order m-1 inner
        attentions (Eq. 10-11), inner weights and gates shared across levels.
    projections: which projection inputs are refined (Table 2: "q", "qk", "qkv").
    inner: "separate" (own attention module per refined projection, Sec. 4.4), "shared" (the layer's
        own attention, Eq. 12) or "self" (parameter-free per-head self-attention on Q/K, Eq. 7-8).
    gate: "zero" adds X + g * Inner(X) with g = 0 at init (function-preserving), "none" is the
        paper's X <- Inner(X).
    inner_init: "random" (paper) or "copy" (inner modules start as copies of the layer's attention;
        only for inner="separate").
    """

    order: int = 2
    projections: tuple[str, ...] = ("q", "k")
    inner: str = "separate"
    gate: str = "zero"
    inner_init: str = "random"

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(
                f"NexusConfig.order must be an integer >= 1 (1 = standard attention), got {self.order!r}"
            )
        object.__setattr__(self, "projections", _parse_projections(self.projections))
        for field, allowed in (("inner", INNER_KINDS), ("gate", GATE_KINDS), ("inner_init", INNER_INITS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"NexusConfig.{field} must be one of {allowed}, got {value!r}")
        if self.inner_init == "copy" and self.inner != "separate":
            raise ValueError(
                f"NexusConfig.inner_init='copy' only applies to inner='separate' (it copies the pretrained "
                f"attention into the new inner modules); inner={self.inner!r} has no inner modules: use inner_init='random'"
            )

    @property
    def levels(self) -> int:
        """Number of inner levels below the outer attention (order - 1)."""
        return self.order - 1

    @property
    def distinct_attention_calls(self) -> int:
        """Distinct attention calls per layer: the paper's 2^m - 1 tree collapses to a chain (DESIGN.md 1)."""
        per_level = 1 if self.inner == "shared" else len(self.projections)
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
    def from_dict(cls, data: dict[str, Any] | None) -> NexusConfig:
        data = dict(data or {})
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


class _NexusConfigMixin:
    """Validates the `nexus` block and points `auto_map` at the bundled modeling code."""

    nexus_family: str

    def __post_init__(self, **kwargs):
        self.nexus = NexusConfig.from_dict(self.nexus).to_dict()
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
    nexus: dict | None = None
    base_model: str | None = None  # what it was converted from (Hub id or path), for model cards
    nexus_tested_transformers: str | None = None  # set on every save: see TESTED_TRANSFORMERS


@strict
class NexusLlamaConfig(_NexusConfigMixin, LlamaConfig):
    model_type = "nexus_llama"
    nexus_family = "Llama"
    nexus: dict | None = None
    base_model: str | None = None  # what it was converted from (Hub id or path), for model cards
    nexus_tested_transformers: str | None = None  # set on every save: see TESTED_TRANSFORMERS


@strict
class NexusMistralConfig(_NexusConfigMixin, MistralConfig):
    model_type = "nexus_mistral"
    nexus_family = "Mistral"
    nexus: dict | None = None
    base_model: str | None = None  # what it was converted from (Hub id or path), for model cards
    nexus_tested_transformers: str | None = None  # set on every save: see TESTED_TRANSFORMERS


@strict
class NexusQwen3Config(_NexusConfigMixin, Qwen3Config):
    model_type = "nexus_qwen3"
    nexus_family = "Qwen3"
    nexus: dict | None = None
    base_model: str | None = None  # what it was converted from (Hub id or path), for model cards
    nexus_tested_transformers: str | None = None  # set on every save: see TESTED_TRANSFORMERS


for _cls in (NexusQwen2Config, NexusLlamaConfig, NexusMistralConfig, NexusQwen3Config):
    _cls.register_for_auto_class("AutoConfig")

__all__ = [
    "TESTED_TRANSFORMERS",
    "NexusConfig",
    "NexusQwen2Config",
    "NexusLlamaConfig",
    "NexusMistralConfig",
    "NexusQwen3Config",
]
