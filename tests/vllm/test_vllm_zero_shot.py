"""`eval --suite zero-shot --backend vllm`: lm-eval's `vllm` model scores a Nexus checkpoint through the
plugin exactly as its `hf` model does (the package's transformers implementation), document by document."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lm_eval")

from typer.testing import CliRunner  # noqa: E402

from nexus_retrofit import NexusConfig  # noqa: E402
from nexus_retrofit.cli import app  # noqa: E402
from tests.vllm.checkpoints import build_checkpoint  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_in_process")]
TASK = "nexus_tiny_arith"  # the shipped offline task (nexus_retrofit/assets/zero_shot)


def _samples(folder):
    return [json.loads(line) for line in (folder / f"samples_{TASK}.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~40 s each on 2 cores: one vLLM engine and one HF model
@pytest.mark.parametrize("inner", ["separate", "self"])
def test_lm_eval_vllm_model_scores_as_the_hf_model(tmp_path, inner):
    checkpoint = build_checkpoint(
        tmp_path / "nexus", "qwen2", NexusConfig(order=2, inner=inner, projections="qk")
    )
    common = ["eval", str(checkpoint), "--tasks", TASK, "--limit", "24", "--dtype", "float32"]
    runner = CliRunner()
    vllm_run = runner.invoke(
        app,
        [*common, "--backend", "vllm", "--max-model-len", "256", "--gpu-memory-utilization", "0.3",
         "--output-dir", str(tmp_path / "vllm")],
    )  # fmt: skip
    assert vllm_run.exit_code == 0, vllm_run.output
    hf_run = runner.invoke(app, [*common, "--backend", "hf", "--output-dir", str(tmp_path / "hf")])
    assert hf_run.exit_code == 0, hf_run.output

    results = {b: json.loads((tmp_path / b / "results.json").read_text()) for b in ("vllm", "hf")}
    assert results["vllm"]["settings"]["backend"] == "vllm" and results["vllm"]["versions"]["lm-eval"]
    assert results["vllm"]["tasks"][TASK]["n_problems"] == 24
    vllm_docs, hf_docs = _samples(tmp_path / "vllm"), _samples(tmp_path / "hf")
    assert [d["problem_index"] for d in vllm_docs] == list(range(24))
    for v, h in zip(vllm_docs, hf_docs):
        assert v["loglikelihoods"] == pytest.approx(h["loglikelihoods"], abs=1e-4)
        assert v["extracted"] == h["extracted"]
    assert results["vllm"]["tasks"][TASK]["acc"] == results["hf"]["tasks"][TASK]["acc"]
    assert results["vllm"]["tasks"][TASK]["acc_norm"] == results["hf"]["tasks"][TASK]["acc_norm"]
