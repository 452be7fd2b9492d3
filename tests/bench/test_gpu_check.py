"""The GPU check's harness and reporting on the CPU (`bench gpu --dry-run`), so a GPU run only measures."""

from __future__ import annotations

import json
import sys

from typer.testing import CliRunner

from nexus_retrofit.bench import gpu_check
from nexus_retrofit.cli import app


def test_dry_run_runs_every_part_and_writes_the_reports(tmp_path):
    out = tmp_path / "gpu"
    result = CliRunner().invoke(app, ["bench", "gpu", "--dry-run", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    parts = {p["part"]: p for p in json.loads((out / "gpu_check.json").read_text())["parts"]}
    assert list(parts) == list(gpu_check.PARTS)
    assert {name: p["status"] for name, p in parts.items()} == {
        "parity": "ok",
        "sft": "ok",
        "speed": "ok",
        "vllm": "skipped",
    }
    assert parts["vllm"]["note"] == "dry run: no vLLM engine is started"

    rows = parts["parity"]["rows"]
    measured = {(r["variant"], r["inputs"]) for r in rows if r["attn"] == "sdpa"}
    variants = ["base"] + [f"{k}-qk-m2" for k in gpu_check.INNER_KINDS]
    assert measured == {(v, i) for v in variants for i in ("left_padded", "packed")}
    assert all(r["rel_error"] <= gpu_check.PARITY_TOL for r in rows if r["attn"] == "sdpa")
    flash = next(r for r in rows if r["attn"] == "flash_attention_2")
    assert flash["status"] == "skipped" and "CUDA" in flash["reason"]

    sft = {r["variant"]: r for r in parts["sft"]["rows"]}
    assert sft["base"]["vs_base"] == 1.0 and sft["separate-qk-m2"]["tokens_per_s"] > 0
    assert sft["liger"]["status"] == "skipped"
    assert (out / "speed" / "speed_cpu.md").exists()
    assert "| parity | ok |" in (out / "gpu_check.md").read_text()

    again = CliRunner().invoke(app, ["bench", "gpu", "--dry-run", "--output-dir", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output  # earlier results are not replaced


def test_failures_and_time_outs_become_the_parts_status(monkeypatch):
    def broken(ctx):
        ctx.add(variant="base", status="ok")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def slow(ctx):
        ctx.add(variant="base", status="ok")
        ctx.check_time()

    def failing(ctx):
        ctx.add(variant="self-qk-m2", status="failed")

    settings = gpu_check.Settings("cpu", small=True)
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "parity", broken)
    result = gpu_check.run_part("parity", settings, budget_s=60)
    assert result.status == "error" and "illegal memory access" in result.note and len(result.rows) == 1
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "parity", slow)
    assert gpu_check.run_part("parity", settings, budget_s=-1).status == "timeout"
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "parity", failing)
    assert gpu_check.run_part("parity", settings, budget_s=60).status == "failed"


def test_isolated_parts_are_killed_at_their_time_box_and_keep_their_rows(tmp_path):
    sink = tmp_path / "part.json"
    writes_then_hangs = (
        "import json, sys, time; "
        f"open({str(sink)!r}, 'w').write(json.dumps(dict(part='sft', rows=[dict(variant='base')]))); "
        "time.sleep(60)"
    )
    result = gpu_check.run_isolated([sys.executable, "-c", writes_then_hangs], sink, "sft", timeout_s=2)
    assert result.status == "timeout" and result.rows == [{"variant": "base"}] and result.seconds < 20

    crash = gpu_check.run_isolated(
        [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "none", "vllm", 30
    )
    assert crash.status == "error" and crash.note.startswith("exit code 3")


def test_a_part_runs_in_its_own_process_as_on_a_gpu(tmp_path):
    """The child command the GPU run uses, end to end (the cheapest part: vLLM, switched off)."""
    result = gpu_check.run_gpu_check(
        tmp_path,
        gpu_check.Settings("cpu", small=True, vllm=False),
        parts=("vllm",),
        isolate=True,
        log=lambda _: None,
    )
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"][0]
    assert part["status"] == "skipped" and part["note"] == "dry run: no vLLM engine is started"
    assert result.name == "gpu_check.md" and not list(tmp_path.glob(".part_*"))
