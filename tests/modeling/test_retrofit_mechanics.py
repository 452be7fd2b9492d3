"""Retrofit mechanics: gate start (zero / open), inner_init zero_out, gate shape and function, the gates'
own learning rate, path-strength probes, and checkpoints written before these settings existed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling import NexusQwen2Config
from nexus_retrofit.train.trainer import (
    gate_statistics,
    nexus_param_groups,
    path_strength,
    set_path_probes,
)
from tests.conftest import FAMILIES, perturb_nexus, tiny_base_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# 1. settings: defaults, refusals, old nexus blocks ------------------------------------------------
@pytest.mark.parametrize(
    "given,expected",
    [
        ({}, dict(gate="open", inner_init="zero_out")),
        (dict(inner="shared"), dict(gate="zero", inner_init="random")),
        (dict(inner="self"), dict(gate="zero", inner_init="random")),
        (dict(gate="zero"), dict(inner_init="random")),
        (dict(inner_init="random"), dict(gate="zero")),
        (dict(inner_init="copy"), dict(gate="zero")),
        (dict(gate="none"), dict(inner_init="random")),
    ],
)
def test_defaults_resolve_to_function_preserving_settings(given, expected):
    cfg = NexusConfig(**given)
    assert {k: getattr(cfg, k) for k in expected} == expected
    if cfg.gate != "none":
        assert cfg.function_preserving
    assert NexusConfig.from_dict(cfg.to_dict()) == cfg  # the saved block round-trips


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(inner="self", inner_init="zero_out"), "only applies to inner='separate'"),
        (dict(inner="shared", inner_init="zero_out"), "only applies to inner='separate'"),
        (dict(gate="zero", inner_init="zero_out"), "needs gate='open'"),
        (dict(gate="none", inner_init="zero_out"), "needs gate='open'"),
        (dict(inner="self", gate="open"), "gate='open' needs inner='separate'"),
        (dict(inner="shared", gate="open"), "gate='open' needs inner='separate'"),
        (dict(gate_shape="row"), "NexusConfig.gate_shape"),
        (dict(gate_fn="sigmoid"), "NexusConfig.gate_fn"),
        (dict(order=7), "NexusConfig.order must be an integer from 1 to 4"),
        (dict(order=0), "NexusConfig.order must be an integer from 1 to 4"),
    ],
)
def test_contradictory_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        NexusConfig(**kwargs)
    assert "\n" not in str(error.value)


OLD_BLOCK = {
    "order": 2,
    "projections": ["q", "k"],
    "inner": "separate",
    "gate": "zero",
    "inner_init": "random",
}


def test_a_nexus_block_without_the_new_settings_reads_as_before():
    nexus = NexusQwen2Config(nexus=OLD_BLOCK).nexus_config
    assert (nexus.gate, nexus.inner_init, nexus.gate_shape, nexus.gate_fn) == (
        "zero",
        "random",
        "channel",
        "identity",
    )


def test_a_nexus_block_recording_a_training_setting_still_loads():
    """Older releases stored gate_lr_multiplier (a training setting) in the nexus block."""
    nexus = NexusQwen2Config(nexus={**OLD_BLOCK, "gate_lr_multiplier": 100.0}).nexus_config
    assert nexus == NexusConfig(**OLD_BLOCK)


def test_an_old_checkpoint_loads_and_computes_what_it_computed(tmp_path, ids):
    model = convert(tiny_base_model(), NexusConfig(**OLD_BLOCK))
    perturb_nexus(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["nexus"] = OLD_BLOCK  # as written before gate_shape / gate_fn / gate_lr_multiplier
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert "gate_lr_multiplier" not in loaded.config.nexus  # a training setting: not the architecture's
    assert (_logits(loaded, ids) - _logits(model.eval(), ids)).abs().max().item() <= 1e-5  # sdpa vs eager


# 2. function preservation at conversion, for every init where it applies --------------------------
PRESERVING = [
    (inner, dict(gate=gate, inner_init=init, gate_shape=shape, gate_fn=fn))
    for inner, gate, init in [
        ("separate", "open", "zero_out"),
        ("separate", "zero", "random"),
        ("separate", "zero", "copy"),
        ("shared", "zero", "random"),
        ("self", "zero", "random"),
    ]
    for shape, fn in [("channel", "identity"), ("head", "identity"), ("scalar", "tanh")]
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("inner,settings", PRESERVING)
def test_function_preserving_inits_keep_the_logits(family, inner, settings, ids):
    worst = 0.0
    for order, proj in ((2, "qk"), (3, "qkv")):
        base = tiny_base_model(family)
        ref = _logits(base, ids)
        model = convert(base, NexusConfig(order=order, projections=proj, inner=inner, **settings))
        assert model.config.nexus_config.function_preserving
        worst = max(worst, (_logits(model, ids) - ref).abs().max().item())
    assert worst <= 1e-5, f"{family}/{inner}/{settings}: max |logit diff| {worst}"


def test_open_gate_with_random_inner_modules_is_only_near_preserving(ids):
    base = tiny_base_model()
    ref = _logits(base, ids)
    model = convert(base, NexusConfig(gate="open", inner_init="random"))
    assert not model.config.nexus_config.function_preserving
    assert 0 < (_logits(model, ids) - ref).abs().max().item() < 0.1


def test_a_fresh_model_from_its_config_starts_at_the_same_values():
    config = convert(tiny_base_model(), NexusConfig()).config
    model = AutoModelForCausalLM.from_config(config)
    attention = model.model.layers[0].self_attn
    assert all(torch.equal(g, torch.ones_like(g)) for g in attention.gates.values())
    assert all(inner.o_proj.weight.abs().max() == 0 for inner in attention.inner.values())


# 3. first-order signal ----------------------------------------------------------------------------
def _grads(settings: dict) -> dict[str, torch.Tensor]:
    model = convert(tiny_base_model(), NexusConfig(**settings)).train()
    torch.manual_seed(0)
    batch = torch.randint(1, 101, (2, 12))
    model(batch, labels=batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if ".inner." in n or ".gates." in n}


def test_zero_out_gives_inner_o_proj_a_first_order_gradient():
    grads = _grads(dict(gate="open", inner_init="zero_out"))
    o_proj = [g for n, g in grads.items() if ".o_proj.weight" in n]
    assert o_proj and all(g is not None and g.abs().max() > 0 for g in o_proj)
    # the rest of the inner module sits behind o_proj = 0 (second order), as LoRA's A behind B = 0
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".q_proj." in n)


def test_zero_gate_gives_the_inner_modules_no_gradient():
    grads = _grads(dict(gate="zero", inner_init="random"))
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".inner." in n)
    assert any(g.abs().max() > 0 for n, g in grads.items() if ".gates." in n)


# 4. gate shapes and functions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "inner,shape,width",
    [
        ("separate", "channel", 64),  # hidden size
        ("separate", "head", 4),  # inner attention heads
        ("shared", "head", 4),
        ("separate", "scalar", 1),
        ("self", "channel", 2 * 16),  # k: kv heads x head dim
        ("self", "head", 2),
    ],
)
def test_gate_widths(inner, shape, width):
    model = convert(tiny_base_model(), NexusConfig(inner=inner, gate="zero", gate_shape=shape))
    assert model.model.layers[0].self_attn.gates["k"].numel() == width


@pytest.mark.parametrize(
    "inner,shape,fn",
    [
        ("separate", "head", "tanh"),
        ("shared", "head", "identity"),
        ("self", "scalar", "tanh"),
        ("self", "head", "identity"),
    ],
)
def test_cached_decoding_matches_the_full_forward_for_every_gate_shape(inner, shape, fn, ids):
    model = convert(tiny_base_model(), NexusConfig(inner=inner, gate="zero", gate_shape=shape, gate_fn=fn))
    perturb_nexus(model)
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
    assert (full - _logits(tiny_base_model(), ids)).abs().max().item() > 1e-6  # the gates act


def test_tanh_bounds_the_gate():
    model = convert(tiny_base_model(), NexusConfig(gate="open", gate_fn="tanh"))
    attention = model.model.layers[0].self_attn
    assert attention.gate_values("q")[0].item() == pytest.approx(torch.tanh(torch.tensor(1.0)).item())


# 5. the gates' own learning rate ------------------------------------------------------------------
@pytest.mark.parametrize(
    "multiplier,gate_multiplier,expected",
    [
        (1.0, None, {"nexus": 1e-4, "nexus_no_decay": 1e-4}),  # gates with the inner modules, as before
        (1.0, 1.0, {"nexus": 1e-4, "nexus_no_decay": 1e-4}),
        (1.0, 100.0, {"nexus": 1e-4, "nexus_no_decay": 1e-4, "nexus_gates": 1e-2}),
        (10.0, 1.0, {"nexus": 1e-3, "nexus_no_decay": 1e-3, "nexus_gates": 1e-4}),
    ],
)
def test_gates_get_their_own_learning_rate(multiplier, gate_multiplier, expected):
    model = convert(tiny_base_model(), NexusConfig(gate="zero"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {n for n in names.values() if n.endswith("weight") and "norm" not in n}
    groups = nexus_param_groups(model.named_parameters(), decay, 0.1, 1e-4, multiplier, gate_multiplier)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["base"] == 1e-4 and {k: v for k, v in lrs.items() if k.startswith("nexus")} == pytest.approx(
        expected
    )
    gates_in = {g["name"] for g in groups for p in g["params"] if ".gates." in names[id(p)]}
    assert gates_in == ({"nexus_gates"} if "nexus_gates" in expected else {"nexus_no_decay"})
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"] == "nexus_gates")
    assert sum(len(g["params"]) for g in groups) == len(names)


# 6. path strength ---------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["separate", "shared", "self"])
def test_path_strength_is_the_gated_share_of_the_input(inner, ids):
    model = convert(tiny_base_model(), NexusConfig(inner=inner, gate="zero"))
    set_path_probes(model, True)
    _logits(model, ids)
    assert path_strength(model) == {"q": 0.0, "k": 0.0}
    perturb_nexus(model)
    _logits(model, ids)
    strength = path_strength(model)
    assert set(strength) == {"q", "k"} and all(v > 0 for v in strength.values())
    set_path_probes(model, False)
    assert not any(a.path_hook for a in model.modules() if hasattr(a, "path_hook"))  # the probe is gone
    assert gate_statistics(model)["nexus_gate_abs_max"] > 0


def test_path_strength_and_gates_are_logged_during_training(tmp_path):
    from nexus_retrofit.demo.assets import tiny_model_path
    from nexus_retrofit.train import run_training

    data = tmp_path / "sft.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{i} + 1?"}],
            "completion": [{"role": "assistant", "content": f"{i + 1}"}],
        }
        for i in range(16)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "model_name_or_path": str(tiny_model_path()),
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "dtype": "float32",
        "nexus": {"order": 2, "gate_lr_multiplier": 10.0},
    }
    logged = [e for e in run_training(recipe).log_history if "loss" in e]
    assert len(logged) == 2
    for entry in logged:
        assert entry["nexus_path_q"] >= 0 and entry["nexus_path_k"] >= 0 and "nexus_gate_abs_mean" in entry
        assert entry["learning_rate_gates"] == pytest.approx(10 * entry["learning_rate"], rel=1e-6)
    assert logged[-1]["nexus_path_q"] > 0  # zero_out: o_proj moves on the first step, the path opens


# 7. the gates' learning rate is a training setting ------------------------------------------------
# (what the checkpoint's nexus block records, what the recipe says, the gates' multiplier expected).
# Before: stored in the architecture config; a recipe changing it for a converted checkpoint was
# refused ("already a Nexus model with other settings").
GATE_LR = [
    pytest.param(None, {"gate_lr_multiplier": 7.0}, 7.0, id="recipe-sets-it-for-a-converted-checkpoint"),
    pytest.param(10.0, {}, 10.0, id="an-older-checkpoint-records-it"),
    pytest.param(10.0, {"gate_lr_multiplier": 2.0}, 2.0, id="the-recipe-wins-over-the-record"),
    pytest.param(None, {}, 100.0, id="measured-default-for-a-zero-gate"),
]


@pytest.mark.parametrize("recorded, block, expected", GATE_LR)
def test_the_gates_learning_rate_comes_from_the_recipe(tmp_path, recorded, block, expected):
    from nexus_retrofit.demo.assets import tiny_model_path
    from nexus_retrofit.train import run_training

    source = tmp_path / "nexus"
    convert(
        AutoModelForCausalLM.from_pretrained(tiny_model_path()), NexusConfig(gate="zero")
    ).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (source / name).write_bytes((tiny_model_path() / name).read_bytes())
    if recorded is not None:  # as an older release wrote it
        config = json.loads((source / "config.json").read_text())
        config["nexus"]["gate_lr_multiplier"] = recorded
        (source / "config.json").write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{i}?"}],
            "completion": [{"role": "assistant", "content": f"{i}"}],
        }
        for i in range(8)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "model_name_or_path": str(source), "dataset_name": str(data), "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "logging_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "use_cpu": True, "report_to": "none", "save_strategy": "no", "dtype": "float32", "nexus": block,
    }  # fmt: skip
    result = run_training(recipe)
    entry = next(e for e in result.log_history if "loss" in e)
    assert entry["learning_rate_gates"] == pytest.approx(expected * entry["learning_rate"], rel=1e-6)
    assert result.nexus["gate_lr_multiplier"] == expected  # and the saved recipe says so
