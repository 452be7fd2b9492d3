"""What the parameter names of a Nexus model say: which parameters a conversion added.

A conversion keeps every pretrained name and adds two kinds, both under the layer's attention:
`...self_attn.inner.<p>.*` (the inner attention modules of `separate`) and `...self_attn.gates.<p>`.
Everything that must tell them apart (optimizer groups, LoRA, parameter counts, model cards,
streaming conversion) asks here.
"""

from __future__ import annotations

INNER_MARKER = ".self_attn.inner."
GATE_MARKER = ".self_attn.gates."

__all__ = ["GATE_MARKER", "INNER_MARKER", "is_gate", "is_inner", "is_nexus_parameter"]


def is_gate(name: str) -> bool:
    return GATE_MARKER in name


def is_inner(name: str) -> bool:
    return INNER_MARKER in name


def is_nexus_parameter(name: str) -> bool:
    """True for parameters that a conversion adds (inner attention modules and gates)."""
    return is_gate(name) or is_inner(name)
