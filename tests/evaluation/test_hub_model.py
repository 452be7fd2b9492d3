"""eval of a Hub model pins the commit its revision points at: the config, the weights the backend
loads and the fingerprint that guards a resume all name that one commit (fake Hub on 127.0.0.1)."""

from __future__ import annotations

import pytest

from nexus_retrofit.evaluation.provenance import model_info
from tests.conftest import save_tiny_base
from tests.fake_hub import COMMIT, FakeHub

CASES = [  # (model id, revision) -> the commit loaded, or the error
    pytest.param("tiny-org/qwen2", None, COMMIT, id="main-pinned"),
    pytest.param("tiny-org/qwen2", COMMIT, COMMIT, id="commit-as-given"),
    pytest.param(
        "tiny-org/missing", None, "model could not find tiny-org/missing (revision main)", id="unknown"
    ),
]


@pytest.mark.parametrize(("model", "revision", "expected"), CASES)
def test_hub_model_is_pinned_to_one_commit(tmp_path, monkeypatch, model, revision, expected):
    from huggingface_hub import constants

    save_tiny_base(tmp_path / "repo", "qwen2")
    with FakeHub({"tiny-org/qwen2": tmp_path / "repo"}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # read once at import: patched here
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        if expected.startswith("model could not"):
            with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
                model_info(model, revision, trust_remote_code=False)
            return
        info = model_info(model, revision, trust_remote_code=False)
        log = hub.log()
    assert info["load_revision"] == expected and info["revision"] == revision
    assert info["fingerprint"] == {"kind": "hub", "repo": model, "revision": revision, "commit": expected}
    assert info["config"]["model_type"] == "qwen2", log  # read from the pinned commit
    fetched = [line for line in log.splitlines() if line.startswith("GET") and "/resolve/" in line]
    assert fetched and all(f"/resolve/{COMMIT}/" in line for line in fetched), log
