"""Streaming conversion gives the in-memory path's checkpoint: same tensors (bit for bit), same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import nexus_retrofit  # noqa: F401  (registers the Nexus classes)
from nexus_retrofit import streaming
from nexus_retrofit.checkpoint import load_causal_lm
from nexus_retrofit.cli import app
from nexus_retrofit.converter import convert, is_nexus_parameter
from nexus_retrofit.modeling import NexusConfig

from .conftest import save_tiny_base, tiny_base_model

SHARDED = "50KB"  # tiny models (~130k parameters) span several shards at this size


def _save_source(folder: Path, family: str, sharded: bool, dtype: torch.dtype = torch.float32) -> Path:
    model = tiny_base_model(family).to(dtype)
    model.save_pretrained(folder, max_shard_size=SHARDED if sharded else "10GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    return folder


def _in_memory(source: Path, out: Path, settings: NexusConfig, seed: int, dtype: str) -> Path:
    """What `nexus-retrofit convert --no-streaming` does: load, seed, convert, save_pretrained."""
    model = load_causal_lm(str(source), dtype)
    torch.manual_seed(seed)
    convert(model, settings).save_pretrained(out)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


CASES = [  # (family, sharded source, settings, --dtype, source dtype)
    ("qwen2", True, dict(inner="separate", inner_init="random", gate="none"), "auto", torch.float32),
    ("qwen2", False, dict(inner="separate", inner_init="copy", gate="zero"), "auto", torch.float32),
    ("llama", True, dict(inner="separate", inner_init="copy", gate="none", projections="qkv"), "auto", None),
    ("llama", False, dict(inner="shared", gate="none"), "auto", torch.float32),
    ("qwen2", True, dict(inner="self", gate="zero", order=3), "auto", torch.float32),
    ("llama", True, {}, "bfloat16", torch.float32),  # every shard rewritten in bf16
    ("qwen2", False, dict(inner="separate", inner_init="random", gate="none"), "float32", torch.bfloat16),
    (
        "gpt_neox",
        True,
        dict(inner="separate", inner_init="random", gate="none", projections="qkv"),
        "auto",
        None,
    ),
    ("gpt_neox_sequential", False, dict(inner="separate", inner_init="copy", gate="zero"), "auto", None),
    ("gpt_neox", True, {}, "auto", torch.float32),  # the default: gate open, inner dense at zero
]


@pytest.mark.parametrize(("family", "sharded", "settings", "dtype", "source_dtype"), CASES)
def test_streaming_matches_in_memory(tmp_path, ids, family, sharded, settings, dtype, source_dtype):
    source = _save_source(tmp_path / "src", family, sharded, source_dtype or torch.float32)
    nexus = NexusConfig(**settings)
    expected = _in_memory(source, tmp_path / "mem", nexus, seed=7, dtype=dtype)
    out = tmp_path / "stream"
    out.mkdir()
    result = streaming.convert_streaming(
        str(source), out, nexus, seed=7, dtype=dtype, max_nexus_shard_bytes=20_000
    )

    want, got = _tensors(expected), _tensors(out)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert _config(out) == _config(expected)
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (expected / "generation_config.json").read_text()
    )
    for code in ("modeling_nexus.py", "configuration_nexus.py"):
        assert (out / code).read_bytes() == (expected / code).read_bytes()
    assert not (out / "model.safetensors").exists()  # transformers would prefer it to the index
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    new_bytes = sum(t.nbytes for n, t in want.items() if is_nexus_parameter(n))  # 0: shared, no gates
    shards = len(result.nexus_shards)
    assert shards == 0 if not new_bytes else shards == 1 if new_bytes <= 20_000 else shards > 1
    converted = dtype != "auto" and (source_dtype or torch.float32) != getattr(torch, dtype)
    assert bool(result.rewritten) == converted
    assert bool(result.copied) != converted
    torch.testing.assert_close(_logits(out, ids), _logits(expected, ids), rtol=0, atol=0)


def test_should_stream_threshold(tmp_path, monkeypatch):
    source = _save_source(tmp_path / "src", "qwen2", sharded=True)
    assert not streaming.should_stream(str(source))
    monkeypatch.setattr(streaming, "AUTO_STREAMING_BYTES", 1000)
    assert streaming.should_stream(str(source))
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 2000)
    monkeypatch.setattr(streaming, "AUTO_STREAMING_BYTES", 10**12)
    assert streaming.should_stream(str(source))  # over half the available RAM
    (tmp_path / "bin").mkdir()
    assert not streaming.should_stream(str(tmp_path / "bin"))  # no safetensors: in-memory only


def test_streaming_needs_safetensors(tmp_path):
    tiny_base_model("qwen2").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="--no-streaming"):
        streaming.convert_streaming(str(tmp_path / "src"), tmp_path / "out", NexusConfig())


def test_cli_convert_streaming(tmp_path, ids):
    source = tmp_path / "src"
    save_tiny_base(source, "qwen2")
    runner = CliRunner()
    args = ["--inner", "separate", "--inner-init", "random", "--gate", "none", "--seed", "3"]
    streamed = runner.invoke(app, ["convert", str(source), str(tmp_path / "a"), "--streaming", *args])
    assert streamed.exit_code == 0, streamed.output
    in_memory = runner.invoke(app, ["convert", str(source), str(tmp_path / "b"), "--no-streaming", *args])
    assert in_memory.exit_code == 0, in_memory.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.safetensors.index.json").is_file() and (b / "model.safetensors").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", ".nexus-retrofit"):
        assert (a / name).is_file(), name
    want, got = _tensors(b), _tensors(a)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids), rtol=0, atol=0)
    # The output owns its files: writing into its reused shard in place (as a later save_pretrained
    # into that folder would) leaves the source's bytes alone.
    before = (source / "model.safetensors").read_bytes()
    (a / "model-00001-of-00001.safetensors").write_bytes(b"overwritten in place")
    assert (source / "model.safetensors").read_bytes() == before
