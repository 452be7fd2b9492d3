"""Loading verifies a Nexus checkpoint: its Nexus tensors (inner attentions, gates) must be exactly the
ones its config's `nexus` block implies, or the load fails in one line (with the package's classes and
with the bundled code under trust_remote_code). transformers alone would start a missing one at random:
different logits on every load, without an error. And the init pass gives the Nexus start values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.converter import nexus_model_config
from nexus_retrofit.modeling import FAMILIES, modeling_nexus
from nexus_retrofit.modeling.modeling_nexus import NexusCheckpointError, nexus_tensor_names
from nexus_retrofit.modeling.names import is_nexus_parameter
from tests.conftest import perturb_nexus, tiny_base_model

SEPARATE = NexusConfig(order=2, projections="qk", inner="separate")  # gate open, inner_init zero_out
SELF_QKV = NexusConfig(order=3, projections="qkv", inner="self", gate="zero")


def _save(folder, family="llama", settings=SEPARATE, **base):
    model = convert(tiny_base_model(family, **base), settings)
    perturb_nexus(model)
    model.save_pretrained(folder)
    return model


def _drop(*names):
    def breakage(folder):
        weights = load_file(folder / "model.safetensors")
        for name in names:
            del weights[name]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    return breakage


def _nexus_block(**changes):
    def breakage(folder):
        config = json.loads((folder / "config.json").read_text())
        config["nexus"].update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return breakage


def _base_weights(folder):
    """The Nexus config.json over a base model's weights (what a Nexus class would load from a base checkpoint)."""
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not is_nexus_parameter(k)}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


L0, L1 = "model.layers.0.self_attn", "model.layers.1.self_attn"
DEFECTS = [
    # (family, settings, how the checkpoint is broken, fragment of the one-line error)
    pytest.param("llama", SEPARATE, _drop(f"{L0}.inner.q.o_proj.weight"), "lacks 1 Nexus tensor(s)", id="no-inner-o_proj"),
    pytest.param("qwen2", SEPARATE, _drop(f"{L1}.inner.k.q_proj.weight", f"{L1}.inner.k.q_proj.bias"), "lacks 2 Nexus tensor(s)", id="no-inner-q_proj"),
    pytest.param("llama", SEPARATE, _drop(f"{L1}.gates.k"), f"lacks 1 Nexus tensor(s) that the nexus block implies ({L1}.gates.k)", id="no-gate"),
    pytest.param("llama", SELF_QKV, _drop(f"{L0}.gates.v"), "lacks 1 Nexus tensor(s)", id="self-no-gate"),
    pytest.param("llama", SEPARATE, _nexus_block(projections=["q", "k", "v"]), f"({L0}.inner.v.q_proj.weight, ", id="config-claims-qkv"),
    pytest.param("llama", SEPARATE, _nexus_block(projections=["q"]), f"holds 10 Nexus tensor(s) that it does not imply ({L0}.gates.k, ", id="config-claims-q"),
    pytest.param("mistral", SEPARATE, _nexus_block(order=1), "holds 20 Nexus tensor(s) that it does not imply", id="config-claims-order-1"),
    pytest.param("qwen3", SEPARATE, _base_weights, "it is a base checkpoint", id="base-weights"),
]  # fmt: skip


@pytest.mark.parametrize("family,settings,breakage,fragment", DEFECTS)
def test_a_defective_checkpoint_is_refused_in_one_line(tmp_path, family, settings, breakage, fragment):
    _save(tmp_path, family, settings)
    breakage(tmp_path)
    with pytest.raises(NexusCheckpointError) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert fragment in message and str(tmp_path) in message
    assert "nexus-retrofit convert" in message


def test_the_bare_model_class_checks_too(tmp_path):
    _save(tmp_path)
    _drop(f"{L0}.gates.q")(tmp_path)
    with pytest.raises(
        NexusCheckpointError, match=r"lacks 1 Nexus tensor\(s\) .*\(layers\.0\.self_attn\.gates\.q\)"
    ):
        modeling_nexus.NexusLlamaModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_base_checkpoint_in_a_nexus_class_names_convert(tmp_path, family):
    """`NexusXForCausalLM.from_pretrained(base, config=<nexus config>)` loaded with every Nexus tensor at
    random (on 5.24 the gates kept uninitialised memory: NaN logits)."""
    base = tiny_base_model(family)
    base.save_pretrained(tmp_path)
    lm_cls = FAMILIES[family][1]
    with pytest.raises(
        NexusCheckpointError, match=r"base checkpoint.*`nexus-retrofit convert SOURCE OUTPUT`"
    ):
        lm_cls.from_pretrained(tmp_path, config=nexus_model_config(base.config, NexusConfig()))


INTACT = [
    pytest.param("qwen2", SEPARATE, {}, id="qwen2-tied-embeddings"),
    pytest.param("llama", SELF_QKV, {}, id="llama-self-m3-qkv"),
    pytest.param("qwen3", NexusConfig(order=2, inner="shared", gate="none"), {}, id="qwen3-shared-no-nexus-tensors"),
    pytest.param("mistral", NexusConfig(order=1), {}, id="mistral-order-1"),
    pytest.param("llama", SEPARATE, {"tie_word_embeddings": True}, id="llama-tied-embeddings"),
]  # fmt: skip


@pytest.mark.parametrize("family,settings,base", INTACT)
def test_an_intact_checkpoint_loads_as_saved(tmp_path, ids, family, settings, base):
    model = _save(tmp_path, family, settings, **base)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert set(info) >= {"missing_keys", "unexpected_keys"} and not info["unexpected_keys"]
    assert not any(is_nexus_parameter(k) for k in info["missing_keys"])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is type(model)  # no info: the model alone


@pytest.mark.parametrize("family,settings", [(f, s) for f, s, _ in (p.values for p in INTACT)][:4])
def test_nexus_tensor_names_of_a_config_are_the_saved_ones(tmp_path, family, settings):
    model = _save(tmp_path, family, settings)
    saved = {k for k in load_file(tmp_path / "model.safetensors") if is_nexus_parameter(k)}
    assert nexus_tensor_names(model.config) == nexus_tensor_names(model)
    assert set(nexus_tensor_names(model.config)) == saved


STANDALONE = textwrap.dedent(
    """
    import sys
    sys.modules["nexus_retrofit"] = None  # make `import nexus_retrofit` fail, as on a machine without it
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ValueError as e:
        print(f"REFUSED {type(e).__name__}: {e}")
        sys.exit(3)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    print("LOADED")
    """
)


@pytest.mark.parametrize("family,settings,breakage,fragment", [DEFECTS[0], DEFECTS[4], DEFECTS[7]])
def test_the_bundled_code_refuses_it_without_the_package(tmp_path, family, settings, breakage, fragment):
    folder = tmp_path / "ckpt"
    _save(folder, family, settings)
    breakage(folder)
    script = tmp_path / "load.py"
    script.write_text(STANDALONE)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, str(script), str(folder)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 3, run.stdout + run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("REFUSED"))
    assert line.startswith("REFUSED NexusCheckpointError: ") and fragment in line


# ------------------------------------------------------------------ the init pass starts Nexus tensors
def _garbage_model(model_cls, config):
    """The model as from_pretrained holds it before its init pass: built on meta, then uninitialised memory."""
    with torch.device("meta"):
        model = model_cls(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


INIT_CASES = [
    pytest.param(family, bare, stock, id=f"{family}-{'Model' if bare else 'ForCausalLM'}-{'stock' if stock else 'custom-code'}-pass")
    for family in ("qwen2", "llama")
    for bare in (False, True)
    for stock in (False, True)
]  # fmt: skip


@pytest.mark.parametrize("family,bare,stock", INIT_CASES)
def test_initialize_weights_gives_the_nexus_start_values(monkeypatch, family, bare, stock):
    """*ForCausalLM's pass runs the inner Model's family `_init_weights` (no gates). And transformers
    counts every class outside its own package as custom code, whose pass marks a module initialised
    when all its direct parameters are: a Nexus attention has none, so it was skipped. `stock` runs
    the pass transformers gives its own classes."""
    config = nexus_model_config(tiny_base_model(family).config, SEPARATE)
    lm_cls = FAMILIES[family][1]
    model_cls = getattr(modeling_nexus, lm_cls.__name__.replace("ForCausalLM", "Model")) if bare else lm_cls
    if stock:
        monkeypatch.setattr(model_cls, "is_custom_code", classmethod(lambda cls: False))
    model = _garbage_model(model_cls, config)
    model.initialize_weights()
    weights = dict(model.named_parameters())
    gates = [w for n, w in weights.items() if ".gates." in n]
    out = [w for n, w in weights.items() if ".inner." in n and "o_proj" in n]
    assert gates and all(torch.equal(g, torch.ones_like(g)) for g in gates)  # gate="open" starts at 1
    assert out and all(torch.equal(w, torch.zeros_like(w)) for w in out)  # inner_init="zero_out"
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_second_init_pass_keeps_trained_gates():
    model = convert(tiny_base_model("llama"), SEPARATE)
    fresh = type(model)(model.config)  # post_init: the init pass and the start values, once
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if ".gates." in n:
                p.fill_(0.25)
    fresh.initialize_weights()
    assert all(torch.all(p == 0.25) for n, p in fresh.named_parameters() if ".gates." in n)
