"""`nexus-retrofit push` against a local stand-in for the Hub API (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

import nexus_retrofit
from nexus_retrofit.cli import app
from nexus_retrofit.hub import CARD_MARKER, PushError, build_model_card, parameter_counts, push_to_hub

RECIPE = "model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\nlearning_rate: 1.0e-4\nnum_train_epochs: 1\n"


@pytest.fixture(scope="module")
def nexus_checkpoint(tmp_path_factory):
    """A tiny converted checkpoint (tied embeddings) and the model it was saved from."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = nexus_retrofit.convert(
        Qwen2ForCausalLM(config), nexus_retrofit.NexusConfig(order=2, projections="qk")
    )
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def checkpoint(tmp_path, nexus_checkpoint):
    """A fresh copy with what a training run leaves behind: a pickle, trainer state and a recipe."""
    path = tmp_path / "model"
    shutil.copytree(nexus_checkpoint[0], path)
    (path / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (path / "recipe.yaml").write_text(RECIPE)
    return path


@pytest.fixture
def results_file(tmp_path, checkpoint):
    """A results.json scored on `checkpoint` (its fingerprint, as `nexus-retrofit eval` records it)."""
    from nexus_retrofit.evaluation.provenance import local_fingerprint

    results = {
        "format": "nexus-retrofit-eval/1",
        "complete": True,
        "model": {"path": str(checkpoint), "fingerprint": local_fingerprint(checkpoint)},
        "settings": {"backend": "vllm", "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 1234, "limit": None},
        "versions": {"math-verify": "0.9.0", "transformers": "5.19.0", "vllm": "0.33.0"},
        "tasks": {
            "math_500": {"pass@1": 0.7234, "stderr": 0.01, "n_problems": 500, "n_samples": 4, "extraction_failure_rate": 0.01,
                         "dataset": {"kind": "hub", "dataset": "HuggingFaceH4/MATH-500", "config": None, "split": "test", "revision": "abc123"}},
            "gpqa_diamond": {"pass@1": 0.35, "stderr": 0.02, "n_problems": 198, "n_samples": 8, "extraction_failure_rate": 0.05,
                             "dataset": {"kind": "local", "path": "/d/gpqa_diamond.jsonl", "sha256": "f" * 64}},
        },
    }  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


class FakeHub:
    """Stands in for the Hub: records calls and copies what upload_folder would send."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def install(self, monkeypatch):
        hub = self

        def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
            hub.calls.append(
                ("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, "repo_type": repo_type})
            )
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kw):
            hub.calls.append(("upload_folder", repo_id, kw))
            folder = Path(folder_path)
            files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            for rel in filter_repo_objects(
                files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
            ):
                target = hub.root / repo_id / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(folder / rel, target)
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hub").install(monkeypatch)


def test_parameter_counts_from_safetensors_headers(nexus_checkpoint):
    path, model = nexus_checkpoint
    counts = parameter_counts(path)
    expected_added = sum(
        p.numel() for n, p in model.named_parameters() if ".self_attn.inner." in n or ".self_attn.gates." in n
    )
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert counts["nexus_added"] == expected_added > 0
    assert counts["base"] == counts["total"] - expected_added


def test_push_uploads_safetensors_and_the_card(checkpoint, results_file, fake_hub):
    plan = push_to_hub(
        checkpoint,
        "me/tiny-nexus",
        private=True,
        results_path=results_file,
        base_model="Qwen/Qwen2.5-1.5B-Instruct",
    )
    assert plan.url == "https://huggingface.co/me/tiny-nexus"
    assert fake_hub.calls[0] == (
        "create_repo",
        "me/tiny-nexus",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    remote = fake_hub.root / "me/tiny-nexus"
    uploaded = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert uploaded == sorted(plan.files)
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "modeling_nexus.py",
        "configuration_nexus.py",
        "nexus_core.py",
        "recipe.yaml",
    } <= set(uploaded)
    assert "training_args.bin" not in uploaded and not any(u.startswith("checkpoint-10") for u in uploaded)
    assert {"training_args.bin", "checkpoint-10/"} <= set(plan.skipped)  # a folder is one entry

    card = ModelCard.load(remote / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert card.data.library_name == "transformers" and "nexus" in card.data.tags
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert results["MATH-500"].metric_value == 72.34 and results["MATH-500"].metric_type == "pass@1"
    assert (
        results["MATH-500"].dataset_type == "HuggingFaceH4/MATH-500"
        and results["MATH-500"].dataset_revision == "abc123"
    )
    assert (
        results["GPQA-Diamond"].metric_value == 35.0
        and results["GPQA-Diamond"].dataset_config == "gpqa_diamond"
    )
    assert card.data.to_dict()["model-index"][0]["name"] == "tiny-nexus"

    text = card.text
    counts = parameter_counts(checkpoint)
    assert f"{counts['total']:,}" in text and f"{counts['nexus_added']:,}" in text
    assert (
        "| Nexus order | 2 |" in text
        and "| Refined projections | q, k |" in text
        and "| Inner attention | separate |" in text
    )
    assert "import nexus_retrofit" in text and 'AutoModelForCausalLM.from_pretrained("me/tiny-nexus"' in text
    assert 'trust_remote_code=True, revision="<commit sha>"' in text
    assert "vllm serve me/tiny-nexus" in text and "pip install 'nexus-retrofit[vllm]'" in text
    assert "learning_rate: 1.0e-4" in text  # the recipe found next to the weights
    assert "| MATH-500 | 72.3 | 1.0 | 500 | 4 | 1.0% |" in text and "math-verify 0.9.0" in text


def test_dry_run_writes_the_card_and_uploads_nothing(checkpoint, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("dry run must not call the Hub")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    result = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-nexus", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would upload to me/tiny-nexus:" in result.stdout and "  model.safetensors" in result.stdout
    assert "left out" in result.stdout and "  training_args.bin" in result.stdout
    card = (checkpoint / "README.md").read_text()
    assert card.startswith("---\n") and CARD_MARKER in card and "Not evaluated yet" in card
    assert (
        "base_model" not in ModelCard.load(checkpoint / "README.md").data.to_dict()
    )  # not recorded, not invented


def test_cli_push_with_results(checkpoint, results_file, fake_hub):
    result = CliRunner().invoke(
        app,
        [
            "push",
            str(checkpoint),
            "me/x",
            "--private",
            "--results",
            str(results_file),
            "--license",
            "apache-2.0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert fake_hub.calls[0][2]["private"] is True and fake_hub.calls[1][0] == "upload_folder"
    card = ModelCard.load(fake_hub.root / "me/x" / "README.md")
    assert card.data.license == "apache-2.0" and len(card.data.eval_results) == 2


def test_a_readme_written_by_someone_else_is_kept(checkpoint, fake_hub):
    (checkpoint / "README.md").write_text("# My notes\n")
    with pytest.raises(PushError, match="--overwrite-card"):
        push_to_hub(checkpoint, "me/x")
    assert (checkpoint / "README.md").read_text() == "# My notes\n" and not fake_hub.calls
    push_to_hub(checkpoint, "me/x", overwrite_card=True)
    assert CARD_MARKER in (checkpoint / "README.md").read_text()
    push_to_hub(checkpoint, "me/x")  # our own card is replaced without asking


@pytest.mark.parametrize(
    "repo_id, setup, message",
    [
        ("no-slash", None, "REPO_ID must look like"),
        ("me/x", "no_weights", "no \\*.safetensors weights"),
        ("me/x", "no_config", "no config.json"),
    ],
)
def test_push_errors_name_the_fix(checkpoint, fake_hub, repo_id, setup, message):
    if setup == "no_weights":
        (checkpoint / "model.safetensors").unlink()
    if setup == "no_config":
        (checkpoint / "config.json").unlink()
    with pytest.raises(PushError, match=message):
        push_to_hub(checkpoint, repo_id)
    assert not fake_hub.calls


def test_cli_push_error_exit_code(checkpoint, tmp_path):
    result = CliRunner().invoke(
        app, ["push", str(checkpoint), "me/x", "--results", str(tmp_path / "missing.json"), "--dry-run"]
    )
    assert result.exit_code == 2 and "--results: no results file" in result.output


def test_card_for_a_base_checkpoint(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    card = build_model_card(tmp_path, "me/base")
    assert "nexus" not in card.data.tags and "Nexus order" not in card.text
    assert "| of which added by Nexus | 0 (0) |" in card.text


# ------------------------------------------------------------------------ train's output, faults
TRL_README = (
    "---\nlibrary_name: transformers\n---\n\n# Model Card for model\n\nThis model is a fine-tuned version of "
    "[x](https://huggingface.co/x).\nIt has been trained using [TRL](https://github.com/huggingface/trl).\n"
)
SECRET = "hf_SECRETsecretSECRET"
TRAIN_CONFIG = (
    f"model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\nlearning_rate: 1.0e-4\nenv:\n  HF_TOKEN: {SECRET}\n"
)


def _train_output(path: Path, config: str) -> None:
    """What `nexus-retrofit train` leaves: its resolved recipe and TRL's automatic README.md."""
    (path / "recipe.yaml").unlink()
    (path / "nexus_train_config.yaml").write_text(config)
    (path / "README.md").write_text(TRL_README)


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])


def _offline(monkeypatch) -> None:
    from huggingface_hub.errors import OfflineModeIsEnabled

    def refuse(*args, **kwargs):
        raise OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled."
        )

    monkeypatch.setattr(HfApi, "create_repo", refuse)


def _no_dns(monkeypatch) -> None:
    import importlib

    client = next((m for m in ("httpx2", "httpx") if importlib.util.find_spec(m)), None)
    if client is None:
        pytest.skip("no httpx client installed")
    connect_error = importlib.import_module(client).ConnectError

    def refuse(*args, **kwargs):
        raise connect_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", refuse)


PUSH_CASES = [
    # (what is wrong, argv extra, exit code, fragment in the output, fragment that must NOT be in it)
    pytest.param(lambda p, m: _truncate(p), ["--dry-run"], 2, "corrupt or truncated", "Traceback", id="truncated"),
    pytest.param(lambda p, m: _offline(m), [], 1, "could not reach the Hub", "Traceback", id="offline"),
    pytest.param(lambda p, m: _no_dns(m), [], 1, "could not reach the Hub", "Traceback", id="no-network"),
    pytest.param(
        lambda p, m: _train_output(p, TRAIN_CONFIG), ["--dry-run"], 0, "  nexus_train_config.yaml", SECRET,
        id="train-output-with-secrets",
    ),
]  # fmt: skip


@pytest.mark.parametrize("setup, extra, code, fragment, absent", PUSH_CASES)
def test_push_faults_are_one_line_and_secrets_stay_home(
    checkpoint, monkeypatch, setup, extra, code, fragment, absent
):
    setup(checkpoint, monkeypatch)
    result = CliRunner().invoke(app, ["push", str(checkpoint), "me/x", *extra])
    assert result.exit_code == code, result.output
    assert fragment in result.output and absent not in result.output
    assert result.exception is None or result.exception.__class__ is SystemExit
    if code != 0:
        assert len(result.output.strip().splitlines()) <= 2  # the card line at most, then the error


def test_push_recognises_train_output_and_never_uploads_secrets(checkpoint, fake_hub):
    _train_output(checkpoint, TRAIN_CONFIG)
    plan = push_to_hub(checkpoint, "me/x")  # TRL's README.md is replaced without --overwrite-card
    card = (checkpoint / "README.md").read_text()
    assert CARD_MARKER in card and "nexus_train_config.yaml" in card and "HF_TOKEN" in card
    assert SECRET not in card and "nexus_train_config.yaml" in plan.skipped
    uploaded = {p.name for p in (fake_hub.root / "me/x").rglob("*")}
    assert "nexus_train_config.yaml" not in uploaded and "README.md" in uploaded


@pytest.mark.parametrize(
    "env, uploaded",
    [
        ("env:\n  HF_TOKEN: <redacted>\n", True),
        ("env:\n  WANDB_API_KEY: '***'\n", True),
        ("env: {}\n", True),
        ("env:\n  WANDB_API_KEY: abc123\n", False),
        ("hub_token: hf_abc\n", False),
        ("env: [unclosed\n", False),
    ],
)
def test_recipe_files_with_secret_values_are_left_out(checkpoint, env, uploaded):
    (checkpoint / "recipe.yaml").unlink()
    (checkpoint / "nexus_train_config.yaml").write_text("learning_rate: 1.0e-4\n" + env)
    plan = push_to_hub(checkpoint, "me/x", dry_run=True)
    assert ("nexus_train_config.yaml" in plan.files) is uploaded
    assert ("nexus_train_config.yaml" in plan.skipped) is not uploaded
    for secret in ("abc123", "hf_abc"):
        assert secret not in (checkpoint / "README.md").read_text()
