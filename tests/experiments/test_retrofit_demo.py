"""The demo-scale retrofit study runs arms through the product's train path and pairs them with the
baseline problem by problem (a smoke-size run: 2 steps, 4 problems)."""

from __future__ import annotations

import json

import torch

from nexus_retrofit.experiments import retrofit_demo


def test_arms_are_seeded_and_paired_with_the_baseline(tmp_path, capsys):
    out = tmp_path / "study.json"
    threads = torch.get_num_threads()  # main() runs on one thread: give the other tests theirs back
    try:
        retrofit_demo.main(
            [
                "--steps",
                "2",
                "--eval",
                "4",
                "--arms",
                "baseline",
                "default",
                "--seed",
                "3",
                "--json",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    baseline, default = json.loads(out.read_text())
    assert (baseline["arm"], default["arm"]) == ("baseline", "default")
    assert baseline["seed"] == default["seed"] == 3 and default["nexus"]["gate"] == "open"
    assert set(default["paired"]) == {"all", "1", "2"} and baseline["paired"]["all"]["differ"] == 0
    for group, expected in (("all", 4), ("1", 2), ("2", 2)):  # 4 problems: half 1-step, half 2-step
        index = [i for i, lv in enumerate(default["levels"]) if group == "all" or str(lv) == group]
        assert len(index) == expected
        changed = sum(default["correct"][i] - baseline["correct"][i] for i in index) / expected
        assert default["paired"][group]["difference"] == changed
        differ = sum(default["completions"][i] != baseline["completions"][i] for i in index)
        assert default["paired"][group]["differ"] == differ
    assert "| default |" in capsys.readouterr().out
