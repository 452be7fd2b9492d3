"""`nexus-retrofit convert` / `inspect`: outputs, parameter report, and clear errors that lose nothing."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from nexus_retrofit.cli import app
from tests.conftest import save_tiny_base

runner = CliRunner()


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    save_tiny_base(folder)
    return folder


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_convert_writes_a_complete_checkpoint(base_dir, tmp_path):
    out = tmp_path / "nexus"
    result = _run(
        "convert", base_dir, out, "--order", 3, "--proj", "qkv", "--inner", "separate", "--inner-init", "copy"
    )
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_nexus.py",
        "configuration_nexus.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert json.loads((out / "config.json").read_text())["base_model"] == str(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied byte for byte
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()

    report = json.loads(_run("inspect", out, "--json").stdout)
    base = json.loads(_run("inspect", base_dir, "--json").stdout)
    # separate adds one attention module per refined projection per layer, plus hidden-size gates
    attention = 2 * 64 * 64 + 2 * (32 * 64) + (64 + 2 * 32)  # q,o + k,v weights (2 KV heads x 16) + biases
    assert report["params_added"] == 2 * 3 * (attention + 64)
    assert report["params_base"] == base["params_total"]
    assert report["distinct_attention_calls"] == 1 + 3 * 2 and report["paper_attention_calls"] == 7
    assert report["cache_ratio"] == 7.0 and base["cache_ratio"] == 1.0


def test_inspect_self_variant_reports_query_heads_in_cache(base_dir, tmp_path):
    out = tmp_path / "nexus"
    assert _run("convert", base_dir, out, "--inner", "self").exit_code == 0
    report = json.loads(_run("inspect", out, "--json").stdout)
    # outer (2 KV heads) + inner-q (all 4 query heads) + inner-k (2 KV heads)
    assert report["cache_ratio"] == (2 + 4 + 2) / 2
    table = _run("inspect", out)
    assert table.exit_code == 0 and "inner-q (4 heads)" in table.stdout


def test_refuses_non_empty_output_without_overwrite(base_dir, tmp_path):
    out = tmp_path / "nexus"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    result = _run("convert", base_dir, out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert _run("convert", base_dir, out, "--overwrite").exit_code == 0
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--inner", "cross"], "NexusConfig.inner must be one of"),
        (["--order", "0"], "NexusConfig.order"),
        (["--proj", "qx"], "NexusConfig.projections"),
        (["--gate", "one"], "NexusConfig.gate"),
        (["--inner", "self", "--inner-init", "copy"], "inner_init='copy' only applies"),
        (["--dtype", "int8"], "--dtype must be one of"),
    ],
)
def test_bad_settings_fail_before_loading(base_dir, tmp_path, args, needle):
    result = _run("convert", base_dir, tmp_path / "out", *args)
    assert result.exit_code == 2 and needle in result.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_refuses_already_converted_and_unsupported_models(base_dir, tmp_path):
    assert _run("convert", base_dir, tmp_path / "n1").exit_code == 0
    again = _run("convert", tmp_path / "n1", tmp_path / "n2")
    assert again.exit_code == 2 and "already a Nexus model" in again.output
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    result = _run("convert", gpt2, tmp_path / "n3")
    assert result.exit_code == 2 and "qwen2, llama, mistral, qwen3" in result.output
    assert not (tmp_path / "n2").exists() and not (tmp_path / "n3").exists()


def test_interrupted_convert_leaves_no_output(base_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    _run("convert", base_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_missing_source_is_a_clear_error(tmp_path):
    result = _run("convert", tmp_path / "does" / "not" / "exist", tmp_path / "out")
    assert result.exit_code == 2 and "could not load" in result.output.replace("\n", " ")
