"""The speed bench runs and measures what it claims (memory growth in n); timings are not asserted."""

from __future__ import annotations

import json

import torch

from nexus_retrofit.bench.speed import VARIANTS, ModelResult, bench_layer, environment, write_report

SMALL_LAYER = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def _growth(results, variant):
    by_n = {r.seq_len: r.largest_activation_mib for r in results if r.variant == variant}
    return by_n[256] / by_n[128]


def test_sdpa_memory_grows_linearly_and_eager_control_does_not(tmp_path):
    torch.manual_seed(0)
    sdpa = bench_layer([128, 256], "cpu", torch.float32, "sdpa", repeats=1, layer_config=SMALL_LAYER)
    assert {r.variant for r in sdpa} == {label for label, _ in VARIANTS}
    for label, _ in VARIANTS:
        assert _growth(sdpa, label) <= 2.2, label  # doubling n at most doubles the largest activation
    assert all(r.forward_ms > 0 and r.train_ratio > 0 for r in sdpa)
    eager = bench_layer([128, 256], "cpu", torch.float32, "eager", repeats=1, layer_config=SMALL_LAYER)
    assert _growth(eager, "base") >= 3.5  # eager materialises n x n scores: the probe sees it

    models = [ModelResult(label, 100.0, 10.0, 50.0) for label, _ in VARIANTS]
    payload = {
        "environment": environment("cpu"),
        "settings": {},
        "layer": [r.__dict__ for r in sdpa],
        "model": [m.__dict__ for m in models],
    }
    report = write_report(tmp_path, payload, sdpa, models)
    assert "separate-qk-m2" in report.read_text()
    assert json.loads((tmp_path / "speed_cpu.json").read_text())["layer"][0]["variant"] == "base"
    assert (tmp_path / "speed_cpu.png").stat().st_size > 0


def test_paired_times_alternate_and_report_the_variant_over_base_ratio():
    import time

    from nexus_retrofit.bench.speed import paired_times

    order = []

    def base():
        order.append("b")
        time.sleep(0.002)

    def variant():
        order.append("v")
        time.sleep(0.006)

    base_s, variant_s, ratio = paired_times(base, variant, "cpu", repeats=5, warmup=1)
    assert order == ["b", "v"] * 6  # warm-up pair, then strictly alternating
    assert base_s < variant_s and 1.8 < ratio < 4.5
