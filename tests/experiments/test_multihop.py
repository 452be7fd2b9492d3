"""The `multihop` task, parameter matching, and its --quick run."""

from __future__ import annotations

import json

import torch

from nexus_retrofit.experiments import multihop as M
from nexus_retrofit.experiments.layers import count_parameters


def test_batch_is_two_hop_pointer_chasing():
    edges, query, answer = M.make_batch(8, 50, torch.Generator().manual_seed(0))
    assert edges.shape == (50, 8, 2)
    for b in range(50):
        f = {int(s): int(t) for s, t in edges[b]}
        assert sorted(f) == list(range(8)) and sorted(f.values()) == list(range(8))  # a permutation
        s, seen = 0, set()
        for _ in range(8):  # one cycle through all 8 symbols
            seen.add(s)
            s = f[s]
        assert len(seen) == 8
        q = int(query[b])
        assert int(answer[b]) == f[f[q]] and len({q, f[q], f[f[q]]}) == 3


def test_parameter_counts_match_within_one_percent():
    settings = M.Settings()
    for depth in settings.depths:
        target = M.target_parameters(settings, depth)
        for variant in M.VARIANTS:
            n = count_parameters(M.build(settings, depth, variant, target))
            assert abs(n - target) / target < 0.01, (depth, variant, n, target)


def test_quick_run_writes_sane_outputs(tmp_path):
    out = M.run(tmp_path, quick=True)
    for path in (out.json_path, out.markdown_path, out.plot_path):
        assert path.exists() and path.stat().st_size > 0
    results = json.loads(out.json_path.read_text())
    assert set(results["runs"]) == {"1-layer", "2-layer"}
    for runs in results["runs"].values():
        sizes = {v: r[0]["parameters"] for v, r in runs.items()}
        assert max(sizes.values()) - min(sizes.values()) <= 0.01 * max(sizes.values())
        for seeds in runs.values():
            for r in seeds:
                assert 0.0 <= r["final_accuracy"] <= 1.0 and r["final_loss"] > 0
                assert r["curve"][0][0] == 0 and r["curve"][-1][0] == results["settings"]["steps"]
    assert "params" in out.markdown_path.read_text()
