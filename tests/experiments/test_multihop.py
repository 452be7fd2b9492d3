"""The `multihop` task, its models (the product's Qwen2 + convert), parameter matching, --quick run."""

from __future__ import annotations

import json

import pytest
import torch

from nexus_retrofit.experiments import multihop as M
from nexus_retrofit.experiments.multihop import count_parameters


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


@pytest.mark.parametrize("fmt", list(M.FORMATS))
def test_parameter_counts_match_within_one_percent(fmt):
    settings = M.Settings()
    for depth in (1, 2):
        target = M.target_parameters(settings, depth, M.FORMATS[fmt])
        for variant in M.VARIANTS:
            n = count_parameters(M.build(settings, depth, variant, target, M.FORMATS[fmt]))
            assert abs(n - target) / target < 0.01, (depth, variant, n, target)


@pytest.mark.parametrize("variant", ["separate", "shared", "self"])
def test_nexus_variants_are_the_products_attention_and_start_as_standard(variant):
    settings = M.Settings()
    torch.manual_seed(0)
    standard = M.build(settings, 1, "standard", fmt=M.FORMATS["reference"])
    torch.manual_seed(0)
    nexus = M.build(settings, 1, variant, fmt=M.FORMATS["reference"])
    assert "Nexus" in type(nexus.lm.model.layers[0].self_attn).__name__
    # gate zero: the converted model computes the standard one's function (same weights where shared)
    nexus.load_state_dict(standard.state_dict(), strict=False)
    edges, query, _ = M.make_batch(8, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(nexus(edges, query), standard(edges, query))


@pytest.mark.parametrize(
    "fmt,positions_matter",
    [("reference", False), ("rope", True), ("edge", False), ("hf-init", False), ("issue", True)],
)
def test_formats_set_the_positional_signal(fmt, positions_matter):
    # with position_ids all 0 the model is invariant to the order of the edges (they are a set)
    torch.manual_seed(0)
    model = M.build(M.Settings(), 1, "standard", fmt=M.FORMATS[fmt]).eval()
    edges, query, _ = M.make_batch(8, 2, torch.Generator().manual_seed(1))
    shuffled = edges[:, torch.randperm(8, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        same = torch.allclose(model(edges, query), model(shuffled, query), atol=1e-5)
    assert same != positions_matter


def test_quick_run_writes_sane_outputs(tmp_path):
    out = M.run(tmp_path, quick=True)
    for path in (out.json_path, out.markdown_path, out.plot_path):
        assert path.exists() and path.stat().st_size > 0
    results = json.loads(out.json_path.read_text())
    assert set(results["runs"]) == {"reference/1-layer"}
    for runs in results["runs"].values():
        sizes = {v: r[0]["parameters"] for v, r in runs.items()}
        assert max(sizes.values()) - min(sizes.values()) <= 0.01 * max(sizes.values())
        for seeds in runs.values():
            for r in seeds:
                assert 0.0 <= r["final_accuracy"] <= 1.0 and r["final_loss"] > 0
                assert r["curve"][0][0] == 0 and r["curve"][-1][0] == results["settings"]["steps"]
    assert "params" in out.markdown_path.read_text()


@pytest.mark.parametrize("fmt", list(M.FORMATS))
def test_the_query_reads_the_edges(fmt):
    # guards against a mask that lets each token see only itself (e.g. position_ids read as packing)
    torch.manual_seed(0)
    model = M.build(M.Settings(), 1, "separate", fmt=M.FORMATS[fmt]).eval()
    edges, query, _ = M.make_batch(8, 2, torch.Generator().manual_seed(1))
    other, _, _ = M.make_batch(8, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(model(edges, query), model(other, query), atol=1e-6)
