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
    assert _run("convert", base_dir, out).exit_code == 0
    result = _run("convert", base_dir, out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert _run("convert", base_dir, out, "--overwrite").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("user data")
    refused = _run("convert", base_dir, mine, "--overwrite")  # never replaces what it did not write
    assert refused.exit_code == 2 and "not written by nexus-retrofit" in refused.output.replace("\n", " ")
    assert [p.name for p in mine.iterdir()] == ["precious.txt"]


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


def _refuse_loading(monkeypatch):
    """Validation must finish before any weights are read: loading fails the test."""
    import nexus_retrofit.checkpoint as checkpoint

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before validation")

    monkeypatch.setattr(checkpoint, "load_causal_lm", loaded)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


SOURCE_DEFECTS = [
    # (how the source is broken, extra argv, fragment of the one-line error)
    pytest.param(lambda f: _edit_config(f, num_key_value_heads=8), [], "num_key_value_heads=8 must divide", id="kv>heads"),
    pytest.param(lambda f: _edit_config(f, num_key_value_heads=3), [], "num_key_value_heads=3 must divide", id="kv-not-dividing"),
    pytest.param(lambda f: None, ["--order", "5"], "NexusConfig.order must be an integer from 1 to 4", id="order-above-max"),
    pytest.param(lambda f: _edit_config(f, model_type="gpt2"), [], "model_type 'gpt2' is not supported", id="unsupported-arch"),
    pytest.param(lambda f: (f / "config.json").write_text("{not json"), [], "is not valid JSON", id="bad-config-json"),
    pytest.param(_truncate_weights, [], "corrupt or truncated", id="truncated-safetensors"),
    pytest.param(
        lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 20), [], "corrupt or truncated", id="garbage-safetensors"
    ),
]  # fmt: skip


@pytest.mark.parametrize("breakage, extra, fragment", SOURCE_DEFECTS)
def test_bad_sources_fail_before_loading(base_dir, tmp_path, monkeypatch, breakage, extra, fragment):
    breakage(base_dir)
    _refuse_loading(monkeypatch)
    result = _run("convert", base_dir, tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize(
    "source",
    ["./typo", "{tmp}/does/not/exist", "~/no-such-model-folder", "base/typo", "a/b/c"],
)
def test_a_missing_local_looking_source_fails_at_once(base_dir, tmp_path, monkeypatch, source):
    """A typo'd folder must not be sent to the Hub (that spent ~50 s in retries before failing)."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)  # so that `base/typo` starts with an existing folder
    _refuse_loading(monkeypatch)
    result = _run("convert", source.format(tmp=tmp_path), tmp_path / "out")
    assert result.exit_code == 2 and "no such local folder" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


INSPECT_DEFECTS = [
    pytest.param(lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON", id="bad-config-json"),
    pytest.param(lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object", id="config-not-object"),
    pytest.param(lambda f: _edit_config(f, model_type="gpt2"), "model_type 'gpt2' is not supported", id="unsupported"),
    pytest.param(_truncate_weights, "corrupt or truncated", id="truncated-safetensors"),
    pytest.param(lambda f: (f / "config.json").unlink(), "no config.json", id="no-config"),
]  # fmt: skip


@pytest.mark.parametrize("breakage, fragment", INSPECT_DEFECTS)
def test_inspect_errors_are_one_line(base_dir, breakage, fragment):
    breakage(base_dir)
    result = _run("inspect", base_dir)
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()) and result.exception.__class__ is SystemExit


# GPT-NeoX / Pythia: a checkpoint as the Hub has them (`embed_out`, config with rotary_pct) ------------
def _pythia_style(folder):
    """The config keys Pythia's Hub configs use (rotary_pct, rotary_emb_base), not rope_parameters."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def pythia_dir(tmp_path):
    folder = tmp_path / "pythia"
    save_tiny_base(folder, "gpt_neox")
    _pythia_style(folder)
    return folder


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "in-memory"])
def test_convert_a_pythia_checkpoint_preserves_its_function(pythia_dir, tmp_path, streaming):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nexus"
    argv = ["convert", pythia_dir, out, "--order", "2", "--proj", "qkv"]
    result = _run(*argv, *([] if streaming else ["--no-streaming"]))
    assert result.exit_code == 0, result.output
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names |= set(f.keys())
    assert "embed_out.weight" in names and "lm_head.weight" not in names  # Pythia's own name for the head
    assert any(".attention.inner.v.query_key_value.weight" in n for n in names)
    ids = torch.randint(1, 100, (2, 9))
    base = AutoModelForCausalLM.from_pretrained(pythia_dir).eval()
    nexus = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(nexus).__name__ == "NexusGPTNeoXForCausalLM"
    assert nexus.config.rope_parameters["partial_rotary_factor"] == 0.25
    with torch.no_grad():
        assert (nexus(ids).logits - base(ids).logits).abs().max().item() <= 1e-5


PYTHIA_DEFECTS = [
    pytest.param(dict(rotary_pct=0.1), "rotary_pct=0.1 rotates 1 of the 16 channels", id="odd-rotary-dims"),
    pytest.param(dict(rotary_pct=0.0), "rotary_pct=0.0 must be in (0, 1]", id="no-rotary"),
    pytest.param(dict(rotary_pct=1.5), "rotary_pct=1.5 must be in (0, 1]", id="rotary-over-one"),
    pytest.param(dict(hidden_size=66), "hidden_size=66 is not a multiple of num_attention_heads=4", id="ragged-heads"),
]  # fmt: skip


@pytest.mark.parametrize("changes, fragment", PYTHIA_DEFECTS)
def test_pythia_layouts_the_code_does_not_handle_fail_before_loading(
    pythia_dir, tmp_path, monkeypatch, changes, fragment
):
    _edit_config(pythia_dir, **changes)
    _refuse_loading(monkeypatch)
    result = _run("convert", pythia_dir, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
