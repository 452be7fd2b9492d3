"""Checkpoints: save -> load gives identical logits, with the package and in a process without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nexus_retrofit import NexusConfig, convert
from tests.conftest import perturb_nexus, tiny_base_model

CASES = [
    pytest.param("qwen2", NexusConfig(order=2, inner="separate"), id="qwen2-separate-m2"),
    pytest.param("llama", NexusConfig(order=3, inner="self", projections="qkv"), id="llama-self-m3-qkv"),
    pytest.param("qwen3", NexusConfig(order=2, inner="shared", gate="none"), id="qwen3-shared-none"),
    pytest.param(
        "gpt_neox", NexusConfig(order=2, inner="separate", projections="qkv"), id="gpt_neox-separate-qkv"
    ),
    pytest.param("gpt_neox_sequential", NexusConfig(order=3, inner="self"), id="gpt_neox_sequential-self-m3"),
    pytest.param("gpt_neox", NexusConfig(order=2, inner="mlp", gate="none"), id="gpt_neox-mlp-control"),
]
# the round trip without the package: one Llama-style family and GPT-NeoX
WITHOUT_PACKAGE = [CASES[0], CASES[1], CASES[3]]


def _saved(tmp_path, family, settings):
    model = convert(tiny_base_model(family), settings)
    perturb_nexus(model)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("family,settings", CASES)
def test_round_trip_in_process(tmp_path, family, settings, ids):
    model, folder = _saved(tmp_path, family, settings)
    config = json.loads((folder / "config.json").read_text())
    assert config["nexus"] == settings.to_dict()
    assert config["architectures"] == [type(model).__name__]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (folder / "modeling_nexus.py").is_file() and (folder / "configuration_nexus.py").is_file()
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()  # no remote code
    assert type(loaded) is type(model)
    assert isinstance(AutoConfig.from_pretrained(folder), type(model.config))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


STANDALONE = textwrap.dedent(
    """
    import sys
    sys.modules["nexus_retrofit"] = None  # make `import nexus_retrofit` fail, as on a machine without it
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not any(m.startswith("nexus_retrofit") and sys.modules[m] is not None for m in sys.modules)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
    """
)


@pytest.mark.parametrize("family,settings", WITHOUT_PACKAGE)
def test_round_trip_without_the_package(tmp_path, family, settings, ids):
    model, folder = _saved(tmp_path, family, settings)
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(STANDALONE)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, torch.load(tmp_path / "out.pt"))


# A source with its own modeling code (`auto_map`) is not the stock architecture that convert builds.
CUSTOM = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
SOURCE_CONFIGS = [
    # (config.json of the source, fragment of the one-line error, or None: accepted)
    pytest.param({"auto_map": CUSTOM}, "auto_map names its own modeling code (AutoModelForCausalLM: modeling_x.XForCausalLM and 1 more)", id="custom-model-code"),
    pytest.param({"auto_map": {"AutoConfig": "configuration_x.XConfig"}}, "(AutoConfig: configuration_x.XConfig)", id="custom-config-code"),
    pytest.param({"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}, None, id="custom-tokenizer-only-ok"),
    pytest.param({"auto_map": {}}, None, id="empty-auto-map-ok"),
    pytest.param({"auto_map": CUSTOM, "model_type": "nexus_llama", "nexus": {}}, "already a Nexus model", id="nexus-source-as-before"),
]  # fmt: skip


@pytest.mark.parametrize("changes,fragment", SOURCE_CONFIGS)
def test_check_config_dict_refuses_custom_code(changes, fragment):
    from nexus_retrofit.checkpoint import check_config_dict

    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, **changes}
    if fragment is None:
        check_config_dict(config, "src")
        return
    with pytest.raises(ValueError) as error:
        check_config_dict(config, "src")
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_convert_refuses_a_custom_code_source_before_writing(tmp_path, monkeypatch, streaming):
    from typer.testing import CliRunner

    import nexus_retrofit.checkpoint as checkpoint
    from nexus_retrofit.cli import app
    from tests.conftest import save_tiny_base

    source = tmp_path / "base"
    save_tiny_base(source, "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "auto_map": CUSTOM}))
    monkeypatch.setattr(checkpoint, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), streaming])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "auto_map names its own modeling code (AutoModelForCausalLM: modeling_x.XForCausalLM" in output
    assert "stock 'llama'" in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
