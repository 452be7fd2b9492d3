"""The `retrofit` experiment: its arms start where they should, and its --quick run is sane."""

from __future__ import annotations

import json
import time

import pytest

from nexus_retrofit.experiments import retrofit as R


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    started = time.time()
    out = R.run(tmp_path_factory.mktemp("retrofit"), quick=True)
    return out, time.time() - started


def test_quick_run_is_fast_and_writes_outputs(quick):
    out, seconds = quick
    assert seconds < 20
    for path in (out.json_path, out.markdown_path, out.plot_path):
        assert path.exists() and path.stat().st_size > 0
    text = out.markdown_path.read_text()
    assert "Positive control" in text and "standard (continued)" in text


def test_function_preserving_arms_start_at_the_pretrained_accuracy(quick):
    results = json.loads(quick[0].json_path.read_text())
    for seed in results["retrofit"]:
        pretrained = seed["pretrain"]["final_accuracy"]
        for arm, run in seed["arms"].items():
            assert run["curve"][-1][0] == results["settings"]["finetune_steps"], arm
            if arm in ("standard (continued)", "zero", "gate-lr", "zero_out"):  # not the paper's ungated form
                assert run["accuracy_at_conversion"] == pretrained, arm


@pytest.mark.parametrize(
    "mechanic,has_gates", [("zero", True), ("gate-lr", True), ("zero_out", True), ("none", False)]
)
def test_mechanics_are_valid_nexus_settings(mechanic, has_gates):
    from nexus_retrofit.modeling import NexusConfig

    settings, multiplier = R.MECHANICS[mechanic]
    config = NexusConfig(order=2, projections="qk", inner="separate", **settings)
    assert (config.gate != "none") == has_gates and multiplier >= 1
