"""`nexus-retrofit init` / `init_from_config`: a random baseline and its Nexus version from a config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config
from typer.testing import CliRunner

import nexus_retrofit
from nexus_retrofit.cli import app
from nexus_retrofit.demo.assets import tiny_model_path
from nexus_retrofit.families import FAMILIES as SUPPORTED
from nexus_retrofit.modeling import NexusConfig
from nexus_retrofit.modeling.names import is_nexus_parameter
from tests.conftest import save_tiny_base, tiny_base_model

runner = CliRunner()
NEOX_MISSING = "gpt_neox" not in SUPPORTED
VOCAB = 128


def _family(name: str):
    return pytest.param(
        name,
        id=name,
        marks=pytest.mark.skipif(name == "gpt_neox" and NEOX_MISSING, reason="no gpt_neox family yet"),
    )


FAMILY_CASES = [_family(f) for f in ("qwen2", "llama", "mistral", "qwen3", "gpt_neox")]
READINGS = [  # (id, CLI flags, the NexusConfig they mean)
    ("paper-default", [], NexusConfig(gate="none")),
    ("shared-zero-gate", ["--inner", "shared", "--gate", "zero"], NexusConfig(inner="shared", gate="zero")),
    ("self-q-order3", ["--inner", "self", "--proj", "q", "--order", "3"],
     NexusConfig(inner="self", projections="q", order=3, gate="none")),
    ("separate-qkv-open", ["--proj", "qkv", "--gate", "open"], NexusConfig(projections="qkv", gate="open")),
]  # fmt: skip


def config_folder(folder: Path, family: str = "qwen2") -> Path:
    """A model folder holding only what init reads: config.json and tokenizer files (no weights)."""
    save_tiny_base(folder, family)
    for name in ("model.safetensors", "generation_config.json"):
        (folder / name).unlink()
    # transformers adds <|endoftext|> (id 101) to that tokenizer on loading: room for it
    tiny_base_model(family, vocab_size=VOCAB).config.save_pretrained(folder)
    return folder


def _init(*args) -> object:
    return runner.invoke(app, ["init", *[str(a) for a in args]])


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _layout(names) -> set[tuple[int, str, str]]:
    """{(layer, "inner" | "gates", projection)} of the Nexus tensors among `names`."""
    found = set()
    for name in names:
        m = re.search(r"layers\.(\d+)\.(?:self_attn|attention)\.(inner|gates)\.([qkv])(?:\.|$)", name)
        if m:
            found.add((int(m[1]), m[2], m[3]))
    return found


def _attention_params(tensors: dict[str, torch.Tensor], layer: int, under: str) -> dict[str, tuple]:
    """{name under the prefix: shape} of layer `layer`'s tensors below `under` (e.g. 'attention.' or
    'attention.inner.q.'), excluding the Nexus modules when reading the layer's own attention."""
    prefix = re.compile(rf"layers\.{layer}\.(?:self_attn|attention)\.{re.escape(under)}")
    out = {}
    for name, t in tensors.items():
        m = prefix.search(name)
        if m and (under or not is_nexus_parameter(name)):
            out[name[m.end() :]] = tuple(t.shape)
    return out


@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize(("reading", "flags", "settings"), [pytest.param(*r, id=r[0]) for r in READINGS])
def test_init_writes_a_baseline_and_its_nexus_version(tmp_path, family, reading, flags, settings, ids):
    source = config_folder(tmp_path / "config", family)
    out = tmp_path / "out"
    result = _init(source, out, *flags)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name != ".nexus-retrofit") == [
        "baseline",
        "init.json",
        "nexus",
    ]
    for folder in ("baseline", "nexus"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (out / folder / name).is_file(), (folder, name)
        assert (out / folder / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (out / "nexus" / "modeling_nexus.py").is_file() and not (
        out / "baseline" / "modeling_nexus.py"
    ).exists()

    base, nexus = (
        load_file(out / "baseline" / "model.safetensors"),
        load_file(out / "nexus" / "model.safetensors"),
    )
    for name, tensor in base.items():  # every base tensor, bit for bit
        assert torch.equal(nexus[name], tensor), name
    added = sorted(set(nexus) - set(base))
    assert all(is_nexus_parameter(n) for n in added), added
    layers = tiny_base_model(family).config.num_hidden_layers
    expected = {
        (i, "inner", p) for i in range(layers) for p in settings.projections if settings.inner == "separate"
    }
    expected |= {
        (i, "gates", p) for i in range(layers) for p in settings.projections if settings.gate != "none"
    }
    assert _layout(added) == expected
    for i in range(layers):  # an inner module is a full attention of the layer's own shape
        for p in settings.projections if settings.inner == "separate" else ():
            assert _attention_params(nexus, i, f"inner.{p}.") == _attention_params(base, i, ""), (i, p)

    config = json.loads((out / "nexus" / "config.json").read_text())
    assert config["nexus"] == settings.to_dict() and config["base_model"] is None
    record = json.loads((out / "init.json").read_text())
    assert record["config_source"] == str(source) and record["seed"] == 0 and record["model_type"] == family
    assert record["nexus_block"] == settings.to_dict() and record["tokenizer"] == str(source)
    assert record["baseline"]["parameters"] == sum(t.numel() for t in base.values())
    assert record["nexus"]["parameters"] == sum(t.numel() for t in nexus.values())
    assert record["nexus"]["added_parameters"] == sum(nexus[n].numel() for n in added)

    # both load with the package; the Nexus model is the baseline exactly when its block preserves it
    with torch.no_grad():
        models = {
            f: AutoModelForCausalLM.from_pretrained(out / f, attn_implementation="eager")
            for f in ("baseline", "nexus")
        }
        logits = {f: m.eval()(ids).logits for f, m in models.items()}
    assert type(models["nexus"]).__name__ == f"Nexus{SUPPORTED[family]}ForCausalLM"
    assert all(torch.isfinite(t).all() for t in logits.values())
    same = torch.equal(logits["baseline"], logits["nexus"])
    assert same == settings.function_preserving, (logits["baseline"] - logits["nexus"]).abs().max()


STANDALONE = textwrap.dedent(
    """
    import json, sys
    sys.modules["nexus_retrofit"] = None  # as on a machine without the package
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 3, 42, 8, 9]])
    out = {}
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
        with torch.no_grad():
            out[folder] = [type(model).__module__, model.eval()(ids).logits.sum().item()]
    print(json.dumps(out))
    """
)


def test_both_folders_load_without_the_package(tmp_path):
    families = [f for f in ("llama", "gpt_neox") if f in SUPPORTED]
    folders = []
    for family in families:
        out = tmp_path / family
        assert _init(config_folder(tmp_path / f"config-{family}", family), out).exit_code == 0
        folders += [out / "baseline", out / "nexus"]
    script = tmp_path / "load.py"
    script.write_text(STANDALONE)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script), *map(str, folders)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    ids = torch.tensor([[5, 17, 3, 42, 8, 9]])
    for folder in folders:
        module, total = loaded[str(folder)]
        is_nexus = folder.name == "nexus"
        assert module.startswith("transformers_modules") == is_nexus, module  # the bundled code ran
        with torch.no_grad():
            mine = (
                AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(ids).logits
            )
        assert total == pytest.approx(mine.sum().item(), rel=1e-5, abs=1e-5), folder


def _files(folder: Path) -> dict[str, bytes]:
    """Every file the init wrote (not the marker: it records when and by which process)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".nexus-retrofit"
    }


def test_the_same_seed_gives_the_same_files_and_another_seed_other_weights(tmp_path):
    source = config_folder(tmp_path / "config")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _init(source, tmp_path / name, "--seed", seed).exit_code == 0
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert sorted(a) == sorted(c)
    for folder in ("baseline", "nexus"):
        weights = f"{folder}/model.safetensors"
        first, other = load_file(tmp_path / "a" / weights), load_file(tmp_path / "c" / weights)
        differ = [n for n in first if not torch.equal(first[n], other[n]) and first[n].std() > 0]
        random = [n for n in first if first[n].std() > 0]  # norms start at 1, biases at 0, any seed
        assert differ == random, sorted(set(random) - set(differ))[:5]


def test_the_python_api_is_the_command(tmp_path):
    source = config_folder(tmp_path / "config", "llama")
    result = nexus_retrofit.init_from_config(source, tmp_path / "py", seed=3)
    assert _init(source, tmp_path / "cli", "--seed", 3).exit_code == 0
    assert result.baseline == (tmp_path / "py" / "baseline").resolve()
    assert result.record["nexus_block"] == NexusConfig(gate="none").to_dict()  # the paper's form by default
    assert _files(tmp_path / "py") == _files(tmp_path / "cli")


def test_a_config_file_and_another_tokenizer(tmp_path):
    """CONFIG may be a bare config.json; --tokenizer brings a tokenizer the config folder lacks."""
    config = tiny_base_model("qwen2", vocab_size=512).config
    config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "out"
    result = _init(tmp_path / "cfg" / "config.json", out, "--tokenizer", tiny_model_path())
    assert result.exit_code == 0, result.output
    record = json.loads((out / "init.json").read_text())
    assert record["tokenizer"] == str(tiny_model_path())
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (out / "nexus" / name).read_bytes() == (tiny_model_path() / name).read_bytes()
    # without a tokenizer anywhere: both checkpoints, no tokenizer, and init.json says so
    bare = _init(tmp_path / "cfg", tmp_path / "bare")
    assert bare.exit_code == 0 and "no tokenizer" in bare.output
    assert json.loads((tmp_path / "bare" / "init.json").read_text())["tokenizer"] is None
    assert not (tmp_path / "bare" / "nexus" / "tokenizer.json").exists()


def _gpt2_config(folder: Path) -> Path:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(folder)
    return folder


def _nexus_folder(folder: Path) -> Path:
    assert _init(config_folder(folder.parent / "for-nexus"), folder).exit_code == 0
    return folder / "nexus"


def _bad_json(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return folder


def _kv_heads(folder: Path) -> Path:
    tiny_base_model("qwen2", vocab_size=VOCAB).config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["num_key_value_heads"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _empty(folder: Path) -> Path:
    folder.mkdir()
    return folder


BAD = [  # (id, CONFIG maker (tmp folder -> path) or None for a good one, extra argv, fragment of the line)
    ("unsupported-family", _gpt2_config, [],
     "model_type 'gpt2' is not supported; supported model types: " + ", ".join(SUPPORTED)),
    ("already-nexus", _nexus_folder, [], "already a Nexus model"),
    ("missing-config-path", lambda f: f / "nope", [], "no such local folder"),
    ("folder-without-config", _empty, [], "no config.json"),
    ("config-not-json", _bad_json, [], "is not valid JSON"),
    ("kv-heads", _kv_heads, [], "num_key_value_heads=3 must divide num_attention_heads=4"),
    ("order", None, ["--order", "9"], "order must be an integer from 1 to 4"),
    ("proj", None, ["--proj", "qx"], "projections"),
    ("inner", None, ["--inner", "cross"], "inner must be one of"),
    ("zero-out-without-open-gate", None, ["--inner-init", "zero_out"], "inner_init='zero_out' needs gate='open'"),
    ("dtype", None, ["--dtype", "int8"], "--dtype must be one of"),
    ("tokenizer-missing", None, ["--tokenizer", "./no/such/tok"], "no such local folder"),
    ("tokenizer-without-files", None, ["--tokenizer", "EMPTY"], "no tokenizer files there"),
    ("tokenizer-larger-than-vocab", None, ["--tokenizer", str(tiny_model_path())],
     "the tokenizer has 512 tokens but the config's vocab_size is 128"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "extra", "fragment"), [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_is_one_line_before_any_write(tmp_path, monkeypatch, make, extra, fragment):
    monkeypatch.chdir(tmp_path)
    source = make(tmp_path / "source") if make else config_folder(tmp_path / "source")
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in extra]
    out = tmp_path / "out"
    line = _one_error(_init(source, out, *extra))
    assert fragment in line, line
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no output, no lock, no temporary


def test_outputs_follow_convert_s_rules(tmp_path):
    source = config_folder(tmp_path / "config")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert "not written by nexus-retrofit" in _one_error(_init(source, theirs, "--overwrite"))
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    assert _init(source, out).exit_code == 0
    assert "--overwrite" in _one_error(_init(source, out, "--seed", 1))
    (out / "NOTES.md").write_text("the user's")
    again = _init(source, out, "--seed", 1, "--overwrite")
    assert again.exit_code == 0 and "NOTES.md" in again.output
    assert (out / "NOTES.md").read_text() == "the user's"
    assert json.loads((out / "init.json").read_text())["seed"] == 1


def test_an_offline_hub_id_says_to_pass_a_local_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    line = _one_error(_init("EleutherAI/pythia-70m", tmp_path / "out"))
    assert "'EleutherAI/pythia-70m' from the Hugging Face Hub" in line
    assert "offline, pass a local model folder or its config.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(NEOX_MISSING, reason="no gpt_neox family yet")
def test_a_hub_id_as_pythia_is_published(tmp_path):
    """`init ORG/NAME OUT` as for EleutherAI/pythia-70m: config and tokenizer come from the Hub (a fake one on
    127.0.0.1, through the real client, in a fresh process and cache), pinned to one commit."""
    from tests.fake_hub import COMMIT, FakeHub

    repo = config_folder(tmp_path / "repo", "gpt_neox")
    with FakeHub({"tiny-org/pythia": repo}) as hub:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        }
        env.update(
            HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1",
        )  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "nexus_retrofit.cli", "init", "tiny-org/pythia", "out"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert {"config.json", "tokenizer.json"} <= hub.downloaded("tiny-org/pythia"), hub.log()
    record = json.loads((tmp_path / "out" / "init.json").read_text())
    assert (
        record["config_source"] == record["tokenizer"] == "tiny-org/pythia" and record["revision"] == COMMIT
    )
    assert record["baseline"]["architecture"] == "GPTNeoXForCausalLM"
    assert (tmp_path / "out" / "nexus" / "tokenizer.json").read_bytes() == (
        repo / "tokenizer.json"
    ).read_bytes()
