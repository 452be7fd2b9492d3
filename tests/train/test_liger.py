"""Liger on both arms: a Nexus model gets the same Liger patches as its family's base model.

Two layers of evidence:
- with a stand-in `liger_kernel.transformers` (always runs): the table registration and the call path
  transformers' Trainer takes (`transformers.integrations.liger.apply_liger_kernel`);
- with the real liger-kernel (where installed; it imports on a CPU with triton): the patched modules of
  a baseline and a Nexus model, Qwen2 and Qwen3, compared module by module. Liger's kernels need a GPU
  to run; here only the patching is checked (tests/gpu runs them).
"""

from __future__ import annotations

import inspect
import sys
from types import MethodType, ModuleType

import pytest
from torch import nn

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.train import liger
from tests.conftest import tiny_base_model

TRL_CONFIG = {"fused_linear_cross_entropy": False}  # what TRL's SFTTrainer passes (it fuses the LM head)


# ---------------------------------------------------------------------------- a stand-in Liger
class FakeLigerRMSNorm(nn.Module):
    def forward(self, x):  # pragma: no cover - only bound, never run
        return x


def _fake_patch(module: nn.Module, forward) -> None:
    """What Liger's _patch_rms_norm_module does: settings on the instance, forward bound to it."""
    module.casting_mode = "llama"
    module.__dict__["forward"] = MethodType(forward, module)


def _fake_family_fn(calls: list, family: str):
    def apply_fn(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=None):
        calls.append(
            (family, dict(rope=rope, rms_norm=rms_norm, swiglu=swiglu, flce=fused_linear_cross_entropy))
        )
        base = getattr(model, model.base_model_prefix, model)
        _fake_patch(base.norm, FakeLigerRMSNorm.forward)
        for layer in base.layers:
            _fake_patch(layer.input_layernorm, FakeLigerRMSNorm.forward)
            if hasattr(layer.self_attn, "q_norm"):  # Qwen3: Liger patches the layer's q/k norms
                _fake_patch(layer.self_attn.q_norm, FakeLigerRMSNorm.forward)

    return apply_fn


def _fake_instance_fn(table):
    """Liger's dispatcher: look the model type up, pass the keywords the function's signature names."""

    def _apply_liger_kernel_to_instance(model, **kwargs):
        fn = table.get(model.config.model_type)
        if fn is not None:
            names = inspect.signature(fn).parameters
            fn(model=model, **{k: v for k, v in kwargs.items() if k in names})

    return _apply_liger_kernel_to_instance


@pytest.fixture
def fake_liger(monkeypatch):
    calls: list = []
    table = {"qwen2": _fake_family_fn(calls, "qwen2"), "qwen3": _fake_family_fn(calls, "qwen3")}
    package, transformers_pkg, monkey_patch = (
        ModuleType("liger_kernel"),
        ModuleType("liger_kernel.transformers"),
        ModuleType(liger.LIGER_TABLE_MODULE),
    )
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = table
    transformers_pkg._apply_liger_kernel_to_instance = _fake_instance_fn(table)
    transformers_pkg.monkey_patch = monkey_patch
    package.transformers = transformers_pkg
    for name, module in [
        ("liger_kernel", package),
        ("liger_kernel.transformers", transformers_pkg),
        (liger.LIGER_TABLE_MODULE, monkey_patch),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(liger.importlib.util, "find_spec", lambda name: object())
    import transformers.integrations.liger as hf_liger

    monkeypatch.setattr(hf_liger, "is_liger_kernel_available", lambda: True)
    return table, calls


def _arms(family: str, inner: str = "separate"):
    base = tiny_base_model(family)
    nexus = convert(tiny_base_model(family), NexusConfig(order=2, inner=inner))
    return base, nexus


def _patch_kinds(model: nn.Module) -> dict[tuple[str, str], int]:
    """{(module class without the Nexus prefix, patched forward): count}."""
    kinds: dict[tuple[str, str], int] = {}
    modules = dict(model.named_modules())
    for name, forward in liger.patched_modules(model).items():
        key = (type(modules[name]).__name__.removeprefix("Nexus"), forward)
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def test_nexus_types_are_registered_under_their_family(fake_liger):
    table, _ = fake_liger
    assert sorted(liger.register_liger()) == ["nexus_qwen2", "nexus_qwen3"]  # no llama/mistral in this table
    assert liger.NEXUS_TO_FAMILY == {
        "nexus_qwen2": "qwen2",
        "nexus_llama": "llama",
        "nexus_mistral": "mistral",
        "nexus_qwen3": "qwen3",
        "nexus_gpt_neox": "gpt_neox",  # Liger ships no GPT-NeoX patch: neither arm gets one
    }
    # Liger filters the keyword arguments by the entry's signature: the wrapper must expose the family's
    assert inspect.signature(table["nexus_qwen2"]) == inspect.signature(table["qwen2"])
    again = table["nexus_qwen2"]
    liger.register_liger()
    assert table["nexus_qwen2"] is not again and table["nexus_qwen2"]._nexus_family == "qwen2"  # idempotent
    shipped = table["nexus_qwen3"] = _fake_family_fn([], "shipped")
    liger.register_liger()
    assert table["nexus_qwen3"] is shipped  # an entry Liger itself ships is never replaced


def test_trainer_call_path_patches_both_arms_alike(fake_liger, caplog):
    from transformers.integrations.liger import apply_liger_kernel

    _, calls = fake_liger
    liger.register_liger()
    base, nexus = _arms("qwen2")
    apply_liger_kernel(base, TRL_CONFIG)
    with caplog.at_level("WARNING", logger=liger.__name__):
        apply_liger_kernel(nexus, TRL_CONFIG)
    assert calls[0] == calls[1] == ("qwen2", dict(rope=True, rms_norm=True, swiglu=True, flce=False))
    assert liger.patched_modules(base) == liger.patched_modules(nexus)
    # rope on: the Nexus attention calls the family's (patched) rotary too, so nothing to warn about
    assert "RoPE" not in caplog.text


def test_inner_modules_get_their_layers_patch(fake_liger):
    from transformers.integrations.liger import apply_liger_kernel

    liger.register_liger()
    base, nexus = _arms("qwen3")
    apply_liger_kernel(base, TRL_CONFIG)
    apply_liger_kernel(nexus, TRL_CONFIG)
    base_paths, nexus_paths = set(liger.patched_modules(base)), set(liger.patched_modules(nexus))
    extra = nexus_paths - base_paths
    assert base_paths <= nexus_paths
    assert extra == {f"model.layers.{i}.self_attn.inner.{p}.q_norm" for i in range(2) for p in "qk"}
    for path in extra:  # bound to the module itself, with the settings the family function gave its sibling
        module = nexus.get_submodule(path)
        assert module.forward.__self__ is module and module.casting_mode == "llama"
        assert module.variance_epsilon == nexus.config.rms_norm_eps


def test_without_liger_nothing_is_registered(monkeypatch):
    monkeypatch.setattr(liger.importlib.util, "find_spec", lambda name: None)
    assert liger.liger_table() is None and liger.register_liger() == []


# ------------------------------------------------------------------------------- the real Liger
@pytest.fixture
def real_liger(monkeypatch):
    """liger-kernel's table, with every module-level swap it makes in transformers undone after the test."""
    pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    for module in (modeling_qwen2, modeling_qwen3):
        for name, value in list(vars(module).items()):
            monkeypatch.setattr(module, name, value)  # restored on teardown
    table = liger.liger_table()
    assert table is not None
    for nexus_type in liger.NEXUS_TO_FAMILY:
        monkeypatch.delitem(table, nexus_type, raising=False)
    shipped = sorted(t for t, family in liger.NEXUS_TO_FAMILY.items() if family in table)
    assert "nexus_qwen2" in shipped and sorted(liger.register_liger()) == shipped
    return table


@pytest.mark.parametrize("inner", ["separate", "shared", "self"])
def test_real_liger_patches_the_same_modules_on_both_arms_qwen2(real_liger, inner):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base, nexus = _arms("qwen2", inner)
    _apply_liger_kernel_to_instance(model=base, **TRL_CONFIG)
    _apply_liger_kernel_to_instance(model=nexus, **TRL_CONFIG)
    assert liger.patched_modules(base) == liger.patched_modules(nexus)
    kinds = _patch_kinds(nexus)
    assert kinds == _patch_kinds(base)
    assert {cls for cls, _ in kinds} == {"Qwen2RMSNorm", "Qwen2MLP"}
    assert kinds[("Qwen2RMSNorm", "LigerRMSNorm.forward")] == 2 * 2 + 1


def test_real_liger_reaches_qwen3_inner_norms_and_fused_cross_entropy(real_liger):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base, nexus = _arms("qwen3")
    _apply_liger_kernel_to_instance(model=base)  # Liger's defaults: fused linear cross-entropy on
    _apply_liger_kernel_to_instance(model=nexus)
    extra = set(liger.patched_modules(nexus)) - set(liger.patched_modules(base))
    assert extra == {
        f"model.layers.{i}.self_attn.inner.{p}.{n}_norm" for i in range(2) for p in "qk" for n in "qk"
    }
    assert _patch_kinds(base).keys() == _patch_kinds(nexus).keys()
    assert "" in liger.patched_modules(nexus)  # the causal-LM forward itself (fused linear cross-entropy)
    assert nexus.forward.__func__ is base.forward.__func__
