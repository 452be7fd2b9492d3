"""On a CUDA device: the GPU check's parts at small shapes, and Liger's kernels on both arms.

Skipped, with the reason, where torch sees no CUDA device. The full measurement is
`nexus-retrofit bench gpu` (nexus_retrofit/bench/gpu_check.py); these are its pass/fail core.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nexus_retrofit import NexusConfig
from nexus_retrofit.bench import gpu_check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

SMALL_CUDA = gpu_check.Settings("cuda", small=True, vllm=False)


def _rows(part: str, settings: gpu_check.Settings = SMALL_CUDA) -> list[dict]:
    result = gpu_check.run_part(part, settings, budget_s=300)
    assert result.status in ("ok", "failed"), result.note
    return result.rows


def test_sdpa_bf16_matches_fp32_eager_padded_and_packed_for_every_inner_kind():
    rows = [r for r in _rows("parity") if r["attn"] == "sdpa"]
    assert len(rows) == 2 * (1 + len(gpu_check.INNER_KINDS))
    assert all(r["status"] == "ok" for r in rows), rows


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
def test_flash_attention_2_matches_fp32_eager_padded_and_packed_for_every_inner_kind():
    rows = [
        r for r in _rows("parity", gpu_check.Settings("cuda", small=False, vllm=False)) if r["attn"] != "sdpa"
    ]
    assert len(rows) == 2 * (1 + len(gpu_check.INNER_KINDS))
    assert all(r["status"] == "ok" for r in rows), rows


def test_sft_steps_run_in_bf16_for_base_and_every_inner_kind():
    rows = {r["variant"]: r for r in _rows("sft") if r.get("tokens_per_s")}
    assert {"base", "separate-qk-m2", "shared-qk-m2", "self-qk-m2"} <= set(rows)
    assert all(r["peak_mib"] > 0 for r in rows.values())


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_run_on_both_arms_and_keep_the_loss(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    from nexus_retrofit.train.liger import patched_modules

    for name, value in list(vars(modeling_qwen2).items()):
        monkeypatch.setattr(modeling_qwen2, name, value)  # Liger's module-level swaps undone after
    config = gpu_check._SMALL
    ids = torch.randint(1, config["vocab_size"], (2, 64), device="cuda")
    for nexus in (None, NexusConfig(order=2)):
        model = gpu_check.build(nexus, config, "cuda", torch.float32, "sdpa")
        plain = model(input_ids=ids, labels=ids).loss.item()
        gpu_check._apply_liger(model)
        assert patched_modules(model), "Liger patched nothing"
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert abs(loss.item() - plain) <= 1e-3 * abs(plain)


def test_the_isolated_runner_works_on_a_gpu(tmp_path):
    report = gpu_check.run_gpu_check(tmp_path, SMALL_CUDA, parts=("parity", "sft"), log=lambda _: None)
    assert "| parity | ok |" in report.read_text() and "| sft | ok |" in report.read_text()
