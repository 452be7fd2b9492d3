"""The experiments' standalone Nexus layer computes what modeling_nexus.py computes."""

from __future__ import annotations

import pytest
import torch

from nexus_retrofit.experiments.layers import MixerSpec, NexusMixer, count_parameters, matched_mlp_hidden
from nexus_retrofit.modeling import NexusQwen2Config
from nexus_retrofit.modeling.modeling_nexus import NexusQwen2Attention

DIM, HEADS, HEAD_DIM = 32, 4, 8

CASES = [
    pytest.param(inner, proj, order, id=f"{inner}-{proj}-m{order}")
    for inner in ("separate", "shared", "self")
    for proj in ("q", "qk", "qkv")
    for order in (2, 3)
]


def _hf_attention(inner: str, proj: str, order: int) -> NexusQwen2Attention:
    config = NexusQwen2Config(
        hidden_size=DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=10,
        nexus=dict(order=order, projections=proj, inner=inner),
    )
    config._attn_implementation = "eager"
    return NexusQwen2Attention(config, 0).eval()


@pytest.mark.parametrize("inner,proj,order", CASES)
def test_mixer_matches_modeling_nexus(inner, proj, order):
    """Same weights, RoPE at angle 0 (cos 1, sin 0), zero q/k/v biases, causal mask: same output."""
    torch.manual_seed(0)
    hf = _hf_attention(inner, proj, order)
    state = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.zero_()
                continue
            if name.startswith("gates."):
                p.normal_()  # a zero gate would hide every inner difference
            state[name if name.startswith(("inner.", "gates.")) else f"attn.{name}"] = p.detach().clone()
    mixer = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec(inner, proj, order), causal=True)
    mixer.load_state_dict(state, strict=True)
    b, n = 2, 7
    x = torch.randn(b, n, DIM)
    cos, sin = torch.ones(b, n, HEAD_DIM), torch.zeros(b, n, HEAD_DIM)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(b, 1, n, n)
    with torch.no_grad():
        expected, _ = hf(x, (cos, sin), mask)
        got = mixer(x)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["separate", "shared", "self", "mlp"])
def test_zero_gate_is_standard_and_nonzero_gate_changes_output(variant):
    torch.manual_seed(0)
    std = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec("standard"), causal=False)
    nx = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec(variant, "qk"), causal=False)
    nx.load_state_dict(std.state_dict(), strict=False)
    x = torch.randn(3, 9, DIM)
    with torch.no_grad():
        torch.testing.assert_close(nx(x), std(x))
        torch.testing.assert_close(nx.attention_probs(x), std.attention_probs(x))
        for g in nx.gates.values():
            g.fill_(0.5)
        assert (nx(x) - std(x)).abs().max() > 1e-3
        assert (nx.attention_probs(x) - std.attention_probs(x)).abs().max() > 1e-4


def test_mlp_control_is_parameter_matched_to_separate():
    sep = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec("separate", "qk"))
    mlp = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec("mlp", "qk"))
    assert abs(count_parameters(mlp) - count_parameters(sep)) <= 2 * (2 * DIM + 1)
    assert matched_mlp_hidden(DIM, HEADS, HEAD_DIM) == round((4 * DIM * DIM - DIM) / (2 * DIM + 1))


def test_mlp_control_is_token_wise():
    """Changing one token changes no other token's refined Q/K in the control (it does in Nexus)."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, DIM)
    y = x.clone()
    y[0, 0] += 1.0
    for variant, mixes in (("mlp", False), ("separate", True)):
        m = NexusMixer(DIM, HEADS, HEAD_DIM, MixerSpec(variant, "qk"), causal=False)
        with torch.no_grad():
            for g in m.gates.values():
                g.fill_(1.0)
            qx, kx, _ = m.qkv(x)
            qy, ky, _ = m.qkv(y)
        moved = max((qx - qy)[:, :, 1:].abs().max(), (kx - ky)[:, :, 1:].abs().max())
        assert (moved > 1e-4) == mixes, variant


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown variant"):
        MixerSpec("linear")
    with pytest.raises(ValueError, match="projections"):
        MixerSpec("separate", "qq")
    with pytest.raises(ValueError, match="order"):
        MixerSpec("self", "qk", order=1)
