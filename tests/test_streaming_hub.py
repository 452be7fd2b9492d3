"""`convert ORG/NAME` through the real huggingface_hub client, against a fake Hub on 127.0.0.1.

The Hub path (snapshot_download for --streaming, from_pretrained for --no-streaming, the tokenizer files
and the auto-streaming size check) cannot reach the real Hub here, so tests/fake_hub.py serves a folder
with the Hub's endpoints. Each conversion runs in its own process with its own HF_HOME, because
huggingface_hub reads HF_ENDPOINT once at import and a shared cache would hide a path that never
downloads: every run must fetch the weights from the fake Hub itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nexus_retrofit import streaming
from nexus_retrofit.cli import app

from .conftest import save_tiny_base, tiny_base_model
from .fake_hub import COMMIT, FakeHub
from .test_streaming import SHARDED, _config, _logits, _tensors

REPO_ROOT = Path(__file__).resolve().parents[1]
# The settings of test_cli_convert_streaming: random inner weights, so a different RNG order would show.
CONVERT_ARGS = ["--inner", "separate", "--inner-init", "random", "--gate", "none", "--seed", "3"]


def _save_repo(folder: Path, family: str, sharded: bool) -> list[str]:
    """A tiny base model with its tokenizer, as published on the Hub; its safetensors files."""
    save_tiny_base(folder, family)
    if sharded:  # the same weights (tiny_base_model is seeded), re-saved as several shards
        (folder / "model.safetensors").unlink()
        tiny_base_model(family).save_pretrained(folder, max_shard_size=SHARDED)
    weights = sorted(f.name for f in folder.glob("*.safetensors"))
    assert (len(weights) >= 2) == sharded, weights
    return weights


def _hub_env(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    """The environment of a process that must use the fake Hub and nothing else: the caller's own HF_*
    settings (a token, HF_HUB_CACHE, offline mode) are dropped so they cannot change the run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **env,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",  # plain HTTP downloads (the fake Hub has no Xet storage)
        "HF_HUB_DISABLE_TELEMETRY": "1",  # else huggingface_hub 2.x asks /api/agent-harnesses for its user-agent
        "PYTHONPATH": os.pathsep.join(pythonpath),  # this checkout, whatever is installed
    }


def _convert(hub: FakeHub, source: str, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`python -m nexus_retrofit.cli convert SOURCE OUT FLAGS` in a fresh process and a fresh cache.
    cwd is OUT's parent, where no folder is named like the repo's org (else SOURCE would look local)."""
    return subprocess.run(
        [sys.executable, "-m", "nexus_retrofit.cli", "convert", source, str(out), *flags],
        env=_hub_env(hub, out.parent / f"hf-{out.name}"),
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_same_checkpoint(got: Path, want: Path, ids: torch.Tensor) -> None:
    """Same tensor names, dtypes and values, and the same logits once loaded."""
    got_tensors, want_tensors = _tensors(got), _tensors(want)
    assert sorted(got_tensors) == sorted(want_tensors)
    for name, tensor in want_tensors.items():
        assert got_tensors[name].dtype == tensor.dtype, name
        assert torch.equal(got_tensors[name], tensor), name
    torch.testing.assert_close(_logits(got, ids), _logits(want, ids), rtol=0, atol=0)


CASES = [  # (family, sharded source)
    pytest.param("qwen2", False, id="qwen2-model.safetensors"),
    pytest.param("llama", True, id="llama-sharded"),
]


@pytest.mark.parametrize(("family", "sharded"), CASES)
def test_convert_from_hub(tmp_path, ids, family, sharded):
    repo_id = f"tiny-org/{family}"
    weights = _save_repo(tmp_path / "repo", family, sharded)
    work = tmp_path / "work"
    work.mkdir()
    with FakeHub({repo_id: tmp_path / "repo"}) as hub:
        runs = {}
        for mode in ("--streaming", "--no-streaming"):
            start = len(hub.requests)
            run = _convert(hub, repo_id, work / mode.strip("-"), mode, *CONVERT_ARGS)
            log = hub.log(start)
            assert run.returncode == 0, f"{mode} failed:\n{run.stderr}\nfake Hub requests:\n{log}"
            # every weight file came from the Hub in this very run (its cache started empty)
            assert set(weights) <= hub.downloaded(repo_id, start), f"{mode}:\n{log}"
            # ... and every file from the one commit `main` pointed at first, never from `main` again
            # (transformers 5.16 still asks `main` whether an adapter_config.json exists: a 404 here)
            fetched = [line for line in log.splitlines() if line.startswith("GET") and "/resolve/" in line]
            assert fetched and all(f"/resolve/{COMMIT}/" in line for line in fetched), f"{mode}:\n{log}"
            runs[mode] = run
        assert not hub.unknown, f"requests the fake Hub does not imitate:\n{hub.log()}"

    streamed, in_memory = work / "streaming", work / "no-streaming"
    summary = " ".join(runs["--streaming"].stderr.split())  # rich wraps the summary line
    assert f"streamed: source shards {len(weights)} copied, 0 rewritten" in summary, summary
    assert "streamed:" not in runs["--no-streaming"].stderr
    _assert_same_checkpoint(streamed, in_memory, ids)
    assert _config(streamed) == _config(in_memory)
    assert _config(streamed)["base_model"] == repo_id  # SOURCE as given, not the cache snapshot path
    # the reused shards are the published bytes, real files in the output (not links into the cache)
    for name in weights:
        placed = streamed / (streaming.SINGLE_FILE_RENAMED if name == streaming.SINGLE_FILE else name)
        assert not placed.is_symlink() and placed.read_bytes() == (tmp_path / "repo" / name).read_bytes()
    for out in (streamed, in_memory):  # tokenizer files copied byte for byte from the Hub
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (tmp_path / "repo" / name).read_bytes(), (out, name)

    # the same source as a local folder gives the same checkpoint (cheap: in this process)
    local = CliRunner().invoke(
        app, ["convert", str(tmp_path / "repo"), str(tmp_path / "local"), "--streaming", *CONVERT_ARGS]
    )
    assert local.exit_code == 0, local.output
    _assert_same_checkpoint(streamed, tmp_path / "local", ids)


def test_convert_unknown_hub_id(tmp_path):
    with FakeHub({"tiny-org/qwen2": tmp_path}) as hub:
        run = _convert(hub, "tiny-org/missing", tmp_path / "out", "--streaming", *CONVERT_ARGS)
        asked = hub.log()
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert lines[0] == (
        "error: could not find tiny-org/missing (revision main) on the Hub (HTTP 404): check the id and "
        "revision, and for a gated or private model log in (`hf auth login`)"
    )
    assert "GET /api/models/tiny-org/missing -> 404" in asked, asked  # the Hub answered, not offline mode
    assert not (tmp_path / "out").exists()


def test_source_weight_bytes_from_hub(tmp_path, monkeypatch):
    """convert's default (--streaming when the weights are large) reads the sizes from the Hub's model
    info without downloading. In this process: huggingface_hub already read HF_ENDPOINT, so the
    endpoint constant is patched instead."""
    from huggingface_hub import constants

    weights = _save_repo(tmp_path / "repo", "qwen2", sharded=True)
    size = sum((tmp_path / "repo" / name).stat().st_size for name in weights)
    with FakeHub({"tiny-org/qwen2": tmp_path / "repo"}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # as in _hub_env
        assert streaming.source_weight_bytes("tiny-org/qwen2") == size
        assert not streaming.should_stream("tiny-org/qwen2")  # ~0.5 MB
        monkeypatch.setattr(streaming, "AUTO_STREAMING_BYTES", size - 1)
        assert streaming.should_stream("tiny-org/qwen2")
        assert streaming.source_weight_bytes("tiny-org/missing") is None  # the in-memory path reports it
        assert not hub.downloaded("tiny-org/qwen2"), hub.log()
        assert "GET /api/models/tiny-org/qwen2 -> 200" in hub.log()
        assert not hub.unknown, hub.log()


PIN_CASES = [  # (source, hub state) -> the revision every later download uses, or the error
    pytest.param("tiny-org/qwen2", "online", COMMIT, id="hub-id-pinned-to-the-commit"),
    pytest.param("tiny-org/qwen2", "offline", None, id="offline-keeps-the-cache-refs"),
    pytest.param("tiny-org/qwen2", "unreachable", None, id="unreachable-falls-back-to-the-cache"),
    pytest.param("LOCAL", "online", None, id="local-folder-untouched"),
    pytest.param(
        "tiny-org/missing", "online", "could not find tiny-org/missing (revision main)", id="unknown-id"
    ),
]


@pytest.mark.parametrize(("source", "state", "expected"), PIN_CASES)
def test_pin_revision(tmp_path, monkeypatch, source, state, expected):
    from huggingface_hub import constants

    from nexus_retrofit.checkpoint import pin_revision

    save_tiny_base(tmp_path / "repo", "qwen2")
    source = str(tmp_path / "repo") if source == "LOCAL" else source
    with FakeHub({"tiny-org/qwen2": tmp_path / "repo"}) as hub:
        endpoint = "http://127.0.0.1:9" if state == "unreachable" else hub.endpoint  # port 9: nothing listens
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", state == "offline")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        if expected and expected.startswith("could not"):
            with pytest.raises(OSError, match=re.escape(expected)):
                pin_revision(source)
        else:
            assert pin_revision(source) == expected
        asked = len(hub.requests)
    assert bool(asked) == (state == "online" and source.startswith("tiny-org/")), hub.log()
