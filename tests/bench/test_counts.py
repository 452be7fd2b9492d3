"""Counted costs: exact FLOP and kernel arithmetic that pins the fused implementation."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nexus_retrofit.bench.counts import (
    SHAPES,
    count_all,
    decode_kernels,
    parameters_and_cache,
    train_flops,
    write_counts,
)
from nexus_retrofit.cli import app
from nexus_retrofit.modeling import NexusConfig

SMALL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
)


def _layer(fn, nexus, **kwargs):
    return fn(SMALL, nexus, layers=2, **kwargs) - fn(SMALL, nexus, layers=1, **kwargs)


def test_shared_flops_are_base_plus_one_attention_pass_without_a_second_v_projection():
    n, d, kv = 64, SMALL["hidden_size"], SMALL["num_key_value_heads"] * 32
    base = _layer(train_flops, None, seq_len=n)
    shared = _layer(train_flops, NexusConfig(order=2, inner="shared"), seq_len=n)
    # One more pass of the layer's own attention (q, k, o projections, kernel), but its V projection
    # of X is the outer one's: computed once (else 3 * 2 * n * d * kv more). torch counts backward
    # as 2x forward, for matmuls and attention alike.
    qko = 2 * n * d * (d + kv + d)
    kernel = 4 * n * n * d * 0.5  # QK^T and PV, causal half
    assert shared - base == pytest.approx(3 * qko + 3 * kernel, rel=1e-9)


def test_attention_flops_are_the_causal_half_of_the_attention_matmuls():
    n, d = 64, SMALL["hidden_size"]
    one_layer = train_flops(SMALL, None, seq_len=n, layers=1)
    no_attention = train_flops(SMALL, None, seq_len=n, layers=0)
    h, kv, ff, v = d, 64, SMALL["intermediate_size"], SMALL["vocab_size"]
    linear = 2 * n * (d * (h + 2 * kv) + h * d + 3 * d * ff)  # q/k/v/o and the MLP, forward
    # The LM head alone. Older transformers (5.16 here) build the RoPE angles with a matmul that the
    # counter sees (n x head_dim FLOPs, 1e-4 of this total); newer ones multiply element-wise.
    assert no_attention == pytest.approx(3 * 2 * n * d * v, rel=1e-4)
    assert one_layer - no_attention == pytest.approx(3 * linear + 3 * 4 * n * n * d * 0.5, rel=1e-9)


def test_decode_kernels_per_layer_stay_near_the_floor():
    """Kernels per decode step and layer, Nexus minus base: the fused implementation's budget.

    Per inner level: one matmul for every inner q/k/v (after concatenating weights and biases), the
    family's rotary function on the level's stacked q and k heads (one call, as the base attention makes
    it), two cache appends, one attention kernel, the output projections and one fused gate each. The
    outer attention launches what the base attention launches. Before fusing, the same count was
    28 / 24 / 13; with fusing and a RoPE of our own over stacked q+k heads it was 11 / 9 / 7, and the family's
    rotary (the same function, hence the same kernel, on both arms: 10 unfused kernels per call on
    this path, one where `kernels` fuses it) costs 10 per level, `self` one more concatenation.
    A regression adds kernels to every layer of every decode step.
    """
    base = _layer(decode_kernels, None)
    extra = {
        label: _layer(decode_kernels, nexus) - base
        for label, nexus in {
            "separate": NexusConfig(order=2, inner="separate"),
            "shared": NexusConfig(order=2, inner="shared"),
            "self": NexusConfig(order=2, inner="self"),
        }.items()
    }
    assert extra == {"separate": 21, "shared": 19, "self": 18}, extra


def test_parameters_and_cache_match_the_readings():
    base_params, base_cache = parameters_and_cache(SMALL, None)
    sep_params, sep_cache = parameters_and_cache(SMALL, NexusConfig(order=2, inner="separate"))
    self_params, self_cache = parameters_and_cache(SMALL, NexusConfig(order=2, inner="self"))
    assert base_cache == 1.0 and sep_cache == 3.0  # outer + inner-q + inner-k slots
    assert self_cache == (2 + 4 + 2) / 2  # the q-side slot holds every query head
    d, layers = SMALL["hidden_size"], SMALL["num_hidden_layers"]
    attention = (d * d + d) + 2 * (d * 64 + 64) + d * d  # q, k, v (with bias), o of one module
    assert sep_params - base_params == layers * (2 * attention + 2 * d)  # inner-q, inner-k + gates
    assert self_params - base_params == layers * (d + 64)  # gates over q heads and k heads


def test_count_all_writes_ratios_against_the_base(tmp_path):
    rows = count_all(256, {"small": {**SMALL, "max_position_embeddings": 512}})
    by = {r.variant: r for r in rows}
    assert by["base"].sft_compute_bound == by["base"].decode_launch_bound == 1.0
    for label in ("separate-qk-m2", "shared-qk-m2", "self-qk-m2"):
        assert 0 < by[label].sft_compute_bound < 1 and 0 < by[label].decode_launch_bound < 1
    # order 3 costs more than order 2 in every regime
    assert by["separate-qk-m3"].train_flops_per_token > by["separate-qk-m2"].train_flops_per_token
    report = write_counts(rows, tmp_path, 256)
    assert "separate-qk-m2" in report.read_text()
    assert json.loads((tmp_path / "counts.json").read_text())["rows"][0]["variant"] == "base"


def test_shapes_are_the_qwen25_family():
    assert SHAPES["Qwen2.5-0.5B"]["hidden_size"] == 896 and SHAPES["Qwen2.5-7B"]["num_key_value_heads"] == 4


def test_cli_rejects_a_bad_sequence_length(tmp_path):
    result = CliRunner().invoke(app, ["bench", "counts", "--seq-len", "0", "--output-dir", str(tmp_path)])
    assert result.exit_code != 0 and "--seq-len" in result.output
    assert not (tmp_path / "counts.md").exists()
