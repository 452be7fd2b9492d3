"""Both arms rotate with one function: the family's own `apply_rotary_pos_emb`, whatever replaced it.

transformers 5.25 kernelizes the stock attention's rotary function on CUDA (with `kernels`), and Liger
swaps the module-level name. Stand-in here: a rotary that is not transformers' arithmetic (computed in
float64, rounded back), installed where those tools install theirs. If the Nexus attention had a RoPE of
its own, a zero-gate conversion would no longer equal its source bit for bit, and the arms would time
different kernels.
"""

from __future__ import annotations

import sys

import pytest
import torch

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling.modeling_nexus import family_rotary
from tests.conftest import FAMILIES, attention_of, decoder_layers, tiny_base_model

FORMS = {  # inner kind -> rotary calls per layer at order m: the outer attention plus one per level
    "separate": lambda m: m,
    "shared": lambda m: m,
    "self": lambda m: m,
    "mlp": lambda m: 1,  # the token-wise control attends only at the outer level
}
CASES = [
    pytest.param(family, inner, order, id=f"{family}-{inner}-m{order}")
    for family in FAMILIES
    for inner in FORMS
    for order in ((2, 3) if inner != "mlp" else (2,))
]


class _Recorder:
    """A replacement rotary: counts its calls and computes in float64 (not the stock arithmetic)."""

    def __init__(self, stock):
        self.stock, self.calls = stock, 0

    def __call__(self, q, k, cos, sin, unsqueeze_dim=1):
        self.calls += 1
        rq, rk = self.stock(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim)
        return rq.to(q.dtype), rk.to(k.dtype)


def _swap_rotary(monkeypatch, attention_class) -> _Recorder:
    module = sys.modules[attention_class.__module__]
    recorder = _Recorder(module.apply_rotary_pos_emb)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", recorder)
    return recorder


@pytest.mark.parametrize("family,inner,order", CASES)
def test_both_arms_call_the_familys_rotary_and_a_zero_gate_stays_bit_identical(
    family, inner, order, ids, monkeypatch
):
    base = tiny_base_model(family)
    stock_attention = type(attention_of(decoder_layers(base)[0]))
    nexus = convert(tiny_base_model(family), NexusConfig(order=order, inner=inner, gate="zero"))
    assert (
        family_rotary(type(attention_of(decoder_layers(nexus)[0])).base_attention_class)
        is vars(sys.modules[stock_attention.__module__])["apply_rotary_pos_emb"]
    )

    recorder = _swap_rotary(monkeypatch, stock_attention)
    layers = len(decoder_layers(base))
    with torch.no_grad():
        base_logits = base(ids).logits
        assert recorder.calls == layers
        recorder.calls = 0
        nexus_logits = nexus(ids).logits
    assert recorder.calls == layers * FORMS[inner](order)
    # gate zero: the outer attention is the base attention's computation, with the same rotary kernel
    assert torch.equal(nexus_logits, base_logits)


def test_the_replacement_is_not_the_stock_arithmetic(ids, monkeypatch):
    """The table above could not fail if the float64 rotary rounded like the stock one everywhere."""
    base = tiny_base_model("qwen2")
    with torch.no_grad():
        stock = base(ids).logits
        _swap_rotary(monkeypatch, type(attention_of(decoder_layers(base)[0])))
        swapped = base(ids).logits
    assert not torch.equal(stock, swapped)
