"""`push` against hostile folders, results and cards: an allow-list, no secrets, no borrowed scores.

Every table row is one thing a training run (or a careless user) can leave in a model folder, one
results.json that would put wrong scores on the card, or one README.md situation. No network: --dry-run,
or the FakeHub stand-in of tests/test_hub.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from typer.testing import CliRunner

import nexus_retrofit
from nexus_retrofit.cli import app
from nexus_retrofit.hub import CARD_MARKER, TRL_CARD_LINE, PushError, push_to_hub

from .test_hub import FakeHub

ASSETS = Path(nexus_retrofit.__file__).parent / "assets" / "tiny-qwen2"
# built by concatenation so that this file holds no credential-shaped literal
HF = "hf_" + "aB3dE5gH7jK9" * 3
OPENAI = "sk-" + "proj-" + "Zy9Xw8Vu7Ts6Rq5Po4Nm3Lk2"
AWS = "AKIA" + "QWERTYUIOP123456"
GITHUB = "ghp_" + "0123456789abcdefABCDEF0123456789abcd"
PLAIN = "s3cr3t-v4lue-42"  # a credential with no recognisable shape: found by its key only
SECRETS = (HF, OPENAI, AWS, GITHUB, PLAIN)
# what a converted checkpoint with a tokenizer holds, and so what push uploads
MODEL_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "configuration_nexus.py",
    "modeling_nexus.py",
    "nexus_core.py",  # imported by modeling_nexus.py: bundled with it
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted checkpoint (save_pretrained bundles its modeling code) with the shipped tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = nexus_retrofit.convert(Qwen2ForCausalLM(config), nexus_retrofit.NexusConfig(order=2))
    path = tmp_path_factory.mktemp("converted")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, path / name)
    return path


@pytest.fixture
def folder(tmp_path, converted):
    path = tmp_path / "model"
    shutil.copytree(converted, path)
    return path


def _write(rel: str, text: str):
    def setup(path: Path, outside: Path) -> None:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)

    return setup


def _append(rel: str, text: str):
    def setup(path: Path, outside: Path) -> None:
        (path / rel).write_text((path / rel).read_text() + text)

    return setup


def _json_set(rel: str, **items):
    def setup(path: Path, outside: Path) -> None:
        data = json.loads((path / rel).read_text())
        data.update(items)
        (path / rel).write_text(json.dumps(data, indent=2))

    return setup


def _link(rel: str, target: str | None):
    """A symlink `rel` to `target`: an absolute path, `outside:NAME` (a file beside the folder, holding a
    secret), `inside:NAME` (a file in a subfolder of the model folder) or None (to nothing)."""

    def setup(path: Path, outside: Path) -> None:
        if target is None:
            dest = path / "gone"
        elif target.startswith("outside:"):
            dest = outside / target.split(":", 1)[1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if (path / rel).is_file():
                shutil.copy(path / rel, dest)
            else:
                dest.write_text(f"HF_TOKEN={HF}\n")
        elif target.startswith("inside:"):
            dest = path / target.split(":", 1)[1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path / rel, dest)
        else:
            dest = Path(target)
        (path / rel).unlink(missing_ok=True)
        (path / rel).symlink_to(dest)

    return setup


def _link_dir(rel: str):
    def setup(path: Path, outside: Path) -> None:
        (outside / "elsewhere").mkdir(parents=True, exist_ok=True)
        (outside / "elsewhere" / "config.json").write_text(json.dumps({"hub_token": HF}))
        (path / rel).symlink_to(outside / "elsewhere", target_is_directory=True)

    return setup


def _safetensors_metadata(**metadata):
    def setup(path: Path, outside: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt", **metadata})

    return setup


# ------------------------------------------------------------------ folder contents: left out
LEFT_OUT = [
    # (what a run leaves, the name listed as left out, a fragment of the reason)
    pytest.param(_write("token", HF + "\n"), "token", "not a model file", id="token-file"),
    pytest.param(
        _write("launch_args.json", json.dumps({"hub_token": HF, "learning_rate": 1e-4})),
        "launch_args.json", "not a model file", id="launch-args-with-hub-token",
    ),
    pytest.param(
        _write("wandb_settings.yaml", f"project: nexus\nWANDB_API_KEY: {PLAIN}\n"),
        "wandb_settings.yaml", "not a model file", id="yaml-with-wandb-api-key",
    ),
    pytest.param(
        _write("wandb/run-x/files/wandb-metadata.json", json.dumps({"args": ["--hub_token", HF]})),
        "wandb/", "folder", id="wandb-run-metadata",
    ),
    pytest.param(_link("passwd", "/etc/passwd"), "passwd", "not a model file", id="symlink-to-etc-passwd"),
    pytest.param(_write("train.py", f'HF_TOKEN = "{HF}"\n'), "train.py", "auto_map", id="stray-python-file"),
    pytest.param(
        _write("nexus_train_config.yaml", f"learning_rate: 1.0e-4\nWANDB_API_KEY: {PLAIN}\n"),
        "nexus_train_config.yaml", "recipe holding secrets", id="recipe-with-top-level-api-key",
    ),
    pytest.param(
        _write("recipe.yaml", f"learning_rate: 1.0e-4\nlaunch: accelerate launch sft.py --hub_token {PLAIN}\n"),
        "recipe.yaml", "recipe holding secrets", id="recipe-with-hub-token-flag",
    ),
    pytest.param(_write("optimizer.pt", "pickle"), "optimizer.pt", "pickle", id="optimizer-pickle"),
    pytest.param(_write("training_args.bin", "pickle"), "training_args.bin", "pickle", id="trainer-pickle"),
    pytest.param(_write(".env", f"HF_TOKEN={HF}\n"), ".env", "hidden", id="dotenv"),
    pytest.param(_write("runs/events.out.tfevents", PLAIN), "runs/", "folder", id="tensorboard-runs"),
    pytest.param(
        _write("checkpoint-5/config.json", json.dumps({"hub_token": HF})), "checkpoint-5/", "folder",
        id="trainer-checkpoint",
    ),
    pytest.param(_link_dir("shared"), "shared/", "folder", id="symlink-to-a-folder-outside"),
    pytest.param(_write("notes.txt", f"export HF_TOKEN={HF}\n"), "notes.txt", "not a model file", id="notes"),
]  # fmt: skip


@pytest.mark.parametrize("setup, name, reason", LEFT_OUT)
def test_hostile_files_are_left_out_and_listed_with_the_reason(folder, tmp_path, setup, name, reason):
    setup(folder, tmp_path / "outside")
    plan = push_to_hub(folder, "me/x", dry_run=True)
    assert set(plan.files) == MODEL_FILES  # the allow-list, nothing else
    assert reason in plan.skipped[name]
    result = CliRunner().invoke(app, ["push", str(folder), "me/x", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = result.stdout.split("left out")[1]
    assert name in listed and reason in listed
    card = (folder / "README.md").read_text()
    for secret in SECRETS:
        assert secret not in result.output and secret not in card


# ------------------------------------------------------------------ folder contents: refused
REFUSED = [
    # (what is wrong with an allowed file, fragments of the one-line error)
    pytest.param(_link("vocab.json", "/etc/passwd"), ["vocab.json", "symlink", "outside the model folder"],
                 id="allowed-name-linked-to-etc-passwd"),
    pytest.param(_link("config.json", "/etc/passwd"), ["config.json", "symlink", "outside the model folder"],
                 id="config-linked-to-etc-passwd"),
    pytest.param(_link("tokenizer.json", "outside:tok/tokenizer.json"), ["tokenizer.json", "outside the model folder"],
                 id="tokenizer-linked-outside"),
    pytest.param(_link("model.safetensors", "outside:weights/model.safetensors"), ["model.safetensors", "symlink"],
                 id="weights-linked-outside"),
    pytest.param(_link("merges.txt", None), ["merges.txt", "not a file"], id="dangling-symlink"),
    pytest.param(_json_set("generation_config.json", hub_token=HF),
                 ["generation_config.json", "a Hugging Face token", "hf auth login"], id="hub-token-in-generation-config"),
    pytest.param(_json_set("config.json", wandb_api_key=PLAIN), ["config.json", "`wandb_api_key`"],
                 id="api-key-in-config"),
    pytest.param(_json_set("tokenizer_config.json", password=PLAIN), ["tokenizer_config.json", "`password`"],
                 id="password-in-tokenizer-config"),
    pytest.param(_json_set("tokenizer_config.json", comment=f"made with {OPENAI}"),
                 ["tokenizer_config.json", "an OpenAI key"], id="openai-key-in-tokenizer-config"),
    pytest.param(_write("special_tokens_map.json", json.dumps({"note": GITHUB})),
                 ["special_tokens_map.json", "a GitHub token"], id="github-token-in-special-tokens-map"),
    pytest.param(_append("chat_template.jinja", f"{{# --hub_token {PLAIN} #}}"),
                 ["chat_template.jinja", "--hub_token"], id="hub-token-flag-in-chat-template"),
    pytest.param(_append("modeling_nexus.py", f'\nKEY = "{AWS}"\n'), ["modeling_nexus.py", "an AWS access key id"],
                 id="aws-key-in-bundled-code"),
    pytest.param(_append("configuration_nexus.py", f'\npassword = "{PLAIN}"\n'),
                 ["configuration_nexus.py", "password", "line"], id="password-in-bundled-code"),
    pytest.param(_safetensors_metadata(hub_token=HF), ["model.safetensors", "safetensors metadata"],
                 id="token-in-safetensors-metadata"),
]  # fmt: skip


@pytest.mark.parametrize("setup, fragments", REFUSED)
def test_allowed_files_that_leak_refuse_the_push_in_one_line(folder, tmp_path, setup, fragments):
    setup(folder, tmp_path / "outside")
    with pytest.raises(PushError) as error:
        push_to_hub(folder, "me/x", dry_run=True)
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not any(secret in message for secret in SECRETS)  # names the kind, never the value
    assert not (folder / "README.md").exists()  # every check runs before the card is written
    result = CliRunner().invoke(app, ["push", str(folder), "me/x", "--dry-run"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


ALLOWED = [
    # (something that looks like a leak and is not, the file that must still be uploaded)
    pytest.param(_json_set("generation_config.json", hub_token="<redacted>"), "generation_config.json",
                 id="redacted-hub-token"),
    pytest.param(_json_set("generation_config.json", hub_token=None), "generation_config.json", id="null-hub-token"),
    pytest.param(_link("tokenizer.json", "inside:files/tokenizer.json"), "tokenizer.json",
                 id="symlink-within-the-folder"),
    pytest.param(_json_set("tokenizer_config.json", bos_token="<|im_start|>", unk_token="token"),
                 "tokenizer_config.json", id="special-tokens-are-not-secrets"),
    pytest.param(_safetensors_metadata(note="trained with nexus-retrofit"), "model.safetensors",
                 id="plain-safetensors-metadata"),
    pytest.param(_write("nexus_train_config.yaml", "learning_rate: 1.0e-4\nenv:\n  HF_TOKEN: <redacted>\n"),
                 "nexus_train_config.yaml", id="recipe-as-train-writes-it"),
]  # fmt: skip


@pytest.mark.parametrize("setup, name", ALLOWED)
def test_look_alikes_are_uploaded(folder, tmp_path, setup, name):
    setup(folder, tmp_path / "outside")
    plan = push_to_hub(folder, "me/x", dry_run=True)
    assert name in plan.files and name not in plan.skipped


def test_the_upload_is_exactly_the_allow_list(folder, tmp_path, monkeypatch):
    """Every left-out row at once, pushed for real to the stand-in Hub: what arrives is the model."""
    for row in LEFT_OUT:
        row.values[0](folder, tmp_path / "outside")
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    result = CliRunner().invoke(app, ["push", str(folder), "me/x"])
    assert result.exit_code == 0, result.output
    remote = hub.root / "me/x"
    uploaded = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert uploaded == MODEL_FILES
    for path in remote.rglob("*"):
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in SECRETS), path


# ------------------------------------------------------------------------------- results.json
RESULTS = [
    # (what is wrong with the results, a change to them, fragments of the one-line error)
    pytest.param(lambda r, fp: r["model"].update(fingerprint={**fp, "sha256": "0" * 64}),
                 ["scored on another model", "000000000000", "FP12"], id="scored-on-another-model"),
    pytest.param(lambda r, fp: r["model"].pop("fingerprint"), ["no model fingerprint", "re-run"],
                 id="no-fingerprint"),
    pytest.param(lambda r, fp: r.pop("model"), ["no model fingerprint"], id="no-model-block"),
    pytest.param(lambda r, fp: r["model"].update(fingerprint={"kind": "hub", "repo": "Qwen/Q", "commit": "a" * 40}),
                 ["Hub model Qwen/Q@aaaaaaaaaaaa"], id="scored-on-a-hub-model"),
    pytest.param(lambda r, fp: r["model"].update(fingerprint={"kind": "local"}), ["without a sha256"],
                 id="fingerprint-without-sha256"),
    pytest.param(lambda r, fp: r["tasks"]["math_500"].update({"pass@1": float("nan")}),
                 ["math_500", "pass@1 = nan", "[0, 1]"], id="nan-score"),
    pytest.param(lambda r, fp: r["tasks"]["math_500"].update({"pass@1": float("inf")}),
                 ["math_500", "pass@1 = inf"], id="inf-score"),
    pytest.param(lambda r, fp: r["tasks"]["aime24"].update({"pass@1": 750.0}), ["aime24", "pass@1 = 750.0"],
                 id="percent-not-fraction"),
    pytest.param(lambda r, fp: r["tasks"]["aime24"].update({"pass@1": -0.1}), ["aime24", "-0.1"],
                 id="negative-score"),
    pytest.param(lambda r, fp: r["tasks"]["aime24"].update({"pass@1": True}), ["aime24", "pass@1 = True"],
                 id="boolean-score"),
    pytest.param(lambda r, fp: r["tasks"]["math_500"].update(stderr=float("nan")), ["math_500", "stderr = nan"],
                 id="nan-stderr"),
    pytest.param(lambda r, fp: r["tasks"]["math_500"].update(extraction_failure_rate=2.0),
                 ["math_500", "extraction_failure_rate = 2.0"], id="failure-rate-above-one"),
    pytest.param(lambda r, fp: None, None, id="scored-on-this-folder"),
]  # fmt: skip


@pytest.mark.parametrize("change, fragments", RESULTS)
def test_results_go_on_the_card_only_when_scored_on_this_folder(folder, tmp_path, change, fragments):
    from nexus_retrofit.evaluation.provenance import local_fingerprint

    fingerprint = local_fingerprint(folder)
    task = {"stderr": 0.01, "n_problems": 30, "n_samples": 4, "extraction_failure_rate": 0.0}
    results = {
        "format": "nexus-retrofit-eval/1",
        "model": {"path": str(folder), "fingerprint": fingerprint},
        "settings": {"backend": "hf", "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64, "seed": 1},
        "versions": {"math-verify": "0.9.0", "transformers": "5.19.0"},
        "tasks": {"math_500": {"pass@1": 0.5, **task}, "aime24": {"pass@1": 0.1, **task}},
    }
    change(results, fingerprint)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))  # nan and inf as JSON's NaN / Infinity, which json.loads reads
    if fragments is None:
        plan = push_to_hub(folder, "me/x", results_path=path, dry_run=True)
        assert {r.metric_value for r in plan.card.data.eval_results} == {50.0, 10.0}
        return
    with pytest.raises(PushError) as error:
        push_to_hub(folder, "me/x", results_path=path, dry_run=True)
    message = str(error.value).replace(fingerprint["sha256"][:12], "FP12")
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not (folder / "README.md").exists()


# ---------------------------------------------------------------------------------- README.md
USER_README = "# My notes\n"
OWN_CARD = f"---\nlicense: mit\n---\n{CARD_MARKER}\n# old card\n"
TRL_CARD = f"# Model Card\n{TRL_CARD_LINE}\n"


def _readme(text: str | None, link: bool = False):
    """README.md holding `text`, or (with `link`) a symlink to a file outside the folder holding it."""

    def setup(path: Path, outside: Path) -> Path | None:
        if text is None:
            return None
        target = outside / "elsewhere.md" if link else path / "README.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if link:
            (path / "README.md").symlink_to(target)
        return target

    return setup


def _disk_fails(monkeypatch) -> None:
    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def _secret_in_config(monkeypatch, path: Path) -> None:
    _json_set("config.json", hub_token=HF)(path, path)


CARDS = [
    # (README.md before, --overwrite-card, a fault, outcome: "written" or an error fragment, the text
    # the original file keeps (the README.md itself, or a symlink's target) when push must not touch it)
    pytest.param(_readme(None), False, None, "written", None, id="no-readme"),
    pytest.param(_readme(OWN_CARD), False, None, "written", None, id="own-card-replaced"),
    pytest.param(_readme(TRL_CARD), False, None, "written", None, id="trl-card-replaced"),
    pytest.param(_readme(USER_README), False, None, "--overwrite-card", USER_README, id="user-readme-kept"),
    pytest.param(_readme(USER_README), True, None, "written", None, id="user-readme-overwritten-when-asked"),
    pytest.param(_readme(OWN_CARD, link=True), False, None, "--overwrite-card", OWN_CARD,
                 id="symlink-to-a-card-outside-refused"),
    pytest.param(_readme(USER_README, link=True), True, None, "written", USER_README,
                 id="symlink-replaced-its-target-untouched"),
    pytest.param(_readme(OWN_CARD), False, _disk_fails, "could not be written", OWN_CARD,
                 id="failed-write-keeps-the-old-card"),
    pytest.param(_readme(OWN_CARD), False, _secret_in_config, "Hugging Face token", OWN_CARD,
                 id="refused-push-keeps-the-old-card"),
]  # fmt: skip


@pytest.mark.parametrize("before, overwrite, fault, outcome, kept", CARDS)
def test_the_card_is_written_atomically_and_only_over_its_own(
    folder, tmp_path, monkeypatch, before, overwrite, fault, outcome, kept
):
    original = before(folder, tmp_path / "outside") or folder / "README.md"
    if fault is _secret_in_config:
        fault(monkeypatch, folder)
    elif fault:
        fault(monkeypatch)
    if outcome == "written":
        push_to_hub(folder, "me/x", dry_run=True, overwrite_card=overwrite)
        card = folder / "README.md"
        assert not card.is_symlink() and CARD_MARKER in card.read_text()
        assert ModelCard.load(card).data.model_name == "x"
    else:
        with pytest.raises(PushError, match=outcome):
            push_to_hub(folder, "me/x", dry_run=True, overwrite_card=overwrite)
    if kept is not None:
        assert original.read_text() == kept
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]  # no temporary left behind
