"""The maths of the `expressivity` experiment, and its --quick run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from nexus_retrofit.experiments import expressivity as E
from nexus_retrofit.experiments.common import mean_std

SETTINGS = dataclasses.replace(E.QUICK, ctx_train=32, ctx_test=32)


def test_rank1_target_is_outside_the_span_of_x_and_one():
    """Theorem 3.1's premise: `a` has no component in span(col(X) ∪ 1), and n > d + 1."""
    for seed in range(3):
        target = E.make_target("rank1", SETTINGS, seed)
        x = target.x_train[0]
        assert x.shape[0] > x.shape[1] + 1
        assert target.info["span_residual"] == pytest.approx(1.0, abs=1e-6)
        rows = target.log_a_train[0].exp()
        torch.testing.assert_close(rows.sum(-1), torch.ones(x.shape[0]))
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))  # A = softmax(1 a^T): all rows equal
    # the residual check itself: a vector inside the span has residual 0
    x = torch.randn(10, 3)
    assert E.span_residual(x, x @ torch.randn(3) + 2.0) < 1e-6


@pytest.mark.parametrize("name", ["rank1", "lowrank", "cue", "majority"])
def test_linear_optimum_beats_random_w_and_is_stationary(name):
    target = E.make_target(name, SETTINGS, 0)
    opt = E.linear_optimum(target.x_train, target.log_a_train)
    assert opt["grad_norm"] < 1e-6 and opt["decrement"] < 1e-10
    x, log_a = target.x_train.double(), target.log_a_train.double()
    d = x.shape[-1]
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        for _ in range(10):
            w = opt["w"] + scale * torch.randn(d, d, generator=g, dtype=torch.float64)
            kl = float(E.kl_to_target(log_a, x @ w @ x.transpose(-1, -2)))
            assert kl >= opt["kl"] - 1e-12
    if name == "rank1":
        assert opt["kl"] > 0.1  # the bottleneck is real: the linear class cannot reach the target


def test_kl_is_zero_exactly_at_the_target():
    target = E.make_target("lowrank", SETTINGS, 0)
    assert float(E.kl_to_target(target.log_a_train, target.log_a_train + 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_descent_linear_fit_approaches_but_never_beats_the_optimum():
    settings = dataclasses.replace(SETTINGS, steps=400)
    target = E.make_target("rank1", settings, 0)
    opt = E.linear_optimum(target.x_train, target.log_a_train)
    fit = E.fit(E.VARIANTS["standard"], target, settings, 0)
    assert opt["kl"] - 1e-5 <= fit["train_kl"] <= opt["kl"] * 1.05


def test_token_wise_control_cannot_beat_the_linear_optimum_on_context_targets():
    """One-hot token types make every token-wise Q/K linear in x: the optimum bounds the control."""
    settings = dataclasses.replace(SETTINGS, steps=200)
    for name in ("cue", "majority"):
        target = E.make_target(name, settings, 0)
        opt = E.linear_optimum(target.x_train, target.log_a_train)
        fit = E.fit(E.VARIANTS["mlp"], target, settings, 0)
        assert fit["train_kl"] >= opt["kl"] - 1e-5


def test_quick_run_writes_sane_outputs(tmp_path):
    out = E.run(tmp_path, quick=True)
    for path in (out.json_path, out.markdown_path, out.plot_path):
        assert path.exists() and path.stat().st_size > 0
    results = json.loads(out.json_path.read_text())
    assert set(results["targets"]) == {"rank1", "lowrank", "cue", "majority"}
    for tname, per_seed in results["targets"].items():
        for row in per_seed:
            opt = row["linear_optimum"]["train_kl"]
            for name, fit in row["fits"].items():
                assert math.isfinite(fit["eval_kl"]) and fit["eval_kl"] >= -1e-6, (tname, name)
            assert row["fits"]["standard"]["train_kl"] >= opt - 1e-5
    assert mean_std([r["linear_optimum"]["train_kl"] for r in results["targets"]["rank1"]])[0] > 0.1
    text = out.markdown_path.read_text()
    assert "exact optimum" in text and "mlp-QK (control)" in text
    assert out.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
