"""NexusConfig validation: every bad value names its field and the allowed values."""

from __future__ import annotations

import json

import pytest

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling import NexusQwen2Config
from nexus_retrofit.modeling.configuration_nexus import MAX_ORDER
from tests.conftest import tiny_base_model


def test_defaults_are_the_function_preserving_retrofit_that_engages():
    cfg = NexusConfig()
    assert (cfg.order, cfg.projections, cfg.inner, cfg.gate, cfg.inner_init) == (
        2,
        ("q", "k"),
        "separate",
        "open",
        "zero_out",
    )
    assert (cfg.gate_shape, cfg.gate_fn, cfg.function_preserving) == ("channel", "identity", True)


@pytest.mark.parametrize("spelling", ["kq", "q,k", ["k", "q"], ("q", "k"), "QK"])
def test_projection_spellings_are_canonical(spelling):
    assert NexusConfig(projections=spelling).projections == ("q", "k")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(order=0), "order"),
        (dict(order=2.0), "order"),
        (dict(order=True), "order"),
        pytest.param(dict(order=5), "order", id="order-above-max"),  # was accepted outside the CLI
        pytest.param(dict(order=100), "order", id="order-100"),
        (dict(projections=""), "projections"),
        (dict(projections="qq"), "projections"),
        (dict(projections=("q", "o")), "projections"),
        (dict(inner="cross"), "inner"),
        (dict(gate="sigmoid"), "gate"),
        (dict(inner_init="xavier"), "inner_init"),
        (dict(inner="shared", inner_init="copy"), "inner_init"),
        pytest.param(dict(inner="mlp", order=3), "inner", id="mlp-control-has-one-level"),
        pytest.param(dict(inner="mlp", gate_shape="head"), "inner", id="mlp-has-no-heads"),
        pytest.param(dict(inner="mlp", inner_init="copy"), "inner_init", id="mlp-cannot-copy-attention"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"NexusConfig.{field}"):
        NexusConfig(**kwargs)


@pytest.mark.parametrize("order", [1, MAX_ORDER])
def test_order_range_ends_are_accepted(order):
    assert NexusConfig(order=order).order == order  # 1: standard attention (`convert --order 1`)


@pytest.mark.parametrize(
    "order",
    [pytest.param(MAX_ORDER + 1, id="max-plus-one"), pytest.param(100, id="order-100")],
)
def test_a_saved_order_above_the_maximum_is_refused_on_load(tmp_path, order):
    """A checkpoint whose config.json says order 100 loaded silently (and ran 100 levels)."""
    from transformers import AutoConfig

    config = convert(tiny_base_model(), NexusConfig()).config
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["nexus"]["order"] = order
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(
        ValueError, match=rf"NexusConfig.order must be an integer from 1 to {MAX_ORDER}.*got {order}"
    ):
        AutoConfig.from_pretrained(tmp_path)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match=r"unknown Nexus setting\(s\) \['ordre'\]"):
        NexusConfig.from_dict({"ordre": 2})


@pytest.mark.parametrize(
    "order,inner,proj,calls",
    [
        (1, "separate", "qk", 1),
        (2, "separate", "qk", 3),
        (3, "separate", "qk", 5),
        (3, "shared", "qkv", 3),
        (3, "self", "qkv", 7),
        (2, "mlp", "qk", 1),  # the token-wise control attends only once
    ],
)
def test_distinct_attention_calls(order, inner, proj, calls):
    cfg = NexusConfig(order=order, inner=inner, projections=proj)
    assert cfg.distinct_attention_calls == calls and cfg.paper_attention_calls == 2**order - 1


def test_model_config_validates_its_nexus_block():
    with pytest.raises(ValueError, match="NexusConfig.inner"):
        NexusQwen2Config(nexus={"inner": "bogus"})
    assert NexusQwen2Config(nexus={"order": 3}).nexus["order"] == 3


def test_convert_argument_errors():
    with pytest.raises(ValueError, match="not both"):
        convert(tiny_base_model(), NexusConfig(), order=3)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        convert(object(), NexusConfig())
    with pytest.raises(ValueError, match="already a Nexus model"):
        convert(convert(tiny_base_model(), NexusConfig()), NexusConfig())
