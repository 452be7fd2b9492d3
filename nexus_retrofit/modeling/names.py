"""What the parameter names of a Nexus model say: which parameters a conversion added.

A conversion keeps every pretrained name and adds two kinds, both under the layer's attention
(`self_attn` in Llama-style families, `attention` in GPT-NeoX): `...self_attn.inner.<p>.*` (the inner
attention modules of `separate`) and `...self_attn.gates.<p>`. Everything that must tell them apart
(optimizer groups, LoRA, parameter counts, model cards, streaming conversion) asks here.
"""

from __future__ import annotations

ATTENTION_ATTRIBUTES = ("self_attn", "attention")  # modeling_nexus.ATTENTION_ATTRIBUTES (bundled: no import)
INNER_MARKERS = tuple(f".{a}.inner." for a in ATTENTION_ATTRIBUTES)
GATE_MARKERS = tuple(f".{a}.gates." for a in ATTENTION_ATTRIBUTES)
# PEFT's exclude_modules and similar: a regex over full module names matching every inner module
INNER_PATTERN = r".*\.(" + "|".join(ATTENTION_ATTRIBUTES) + r")\.inner\..*"

__all__ = [
    "ATTENTION_ATTRIBUTES",
    "GATE_MARKERS",
    "INNER_MARKERS",
    "INNER_PATTERN",
    "is_gate",
    "is_inner",
    "is_nexus_parameter",
    "split_inner",
]


def is_gate(name: str) -> bool:
    return any(m in name for m in GATE_MARKERS)


def is_inner(name: str) -> bool:
    return any(m in name for m in INNER_MARKERS)


def is_nexus_parameter(name: str) -> bool:
    """True for parameters that a conversion adds (inner attention modules and gates)."""
    return is_gate(name) or is_inner(name)


def split_inner(name: str) -> tuple[str, str] | None:
    """(`self_attn.inner.`, what follows) for a name under an inner module, the attention attribute as
    the family names it; None for any other name."""
    for attribute, marker in zip(ATTENTION_ATTRIBUTES, INNER_MARKERS):
        if marker in name:
            return f"{attribute}.inner.", name.rsplit(marker, 1)[1]
    return None
