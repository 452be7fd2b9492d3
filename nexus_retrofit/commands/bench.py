"""`nexus-retrofit bench speed`: Nexus vs base model speed and memory (see nexus_retrofit.bench)."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(
    help="Benchmarks: measured numbers, ratios against the base model in the same process."
)


@bench_app.command("speed")
def speed(
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seq_lens: str = typer.Option(
        None, "--seq-lens", help="Comma-separated sequence lengths (default by device)."
    ),
    quick: bool = typer.Option(False, "--quick", help="A short smoke run (fewer lengths and repeats)."),
    attn: str = typer.Option(
        "sdpa", "--attn", help="Attention implementation: sdpa, eager or flash_attention_2."
    ),
    output_dir: Path = typer.Option(
        Path("eval/results/perf"), "--output-dir", help="Where JSON/markdown/PNG go."
    ),
) -> None:
    """One attention layer and the whole model, base vs Nexus variants (orders 2 and 3)."""
    from rich.console import Console

    from ..bench.speed import run_speed_bench

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("--device must be cpu or cuda")
    try:
        lens = [int(s) for s in seq_lens.split(",")] if seq_lens else None
    except ValueError:
        raise typer.BadParameter(f"--seq-lens must be comma-separated integers, got {seq_lens!r}") from None
    console = Console()
    with console.status("benchmarking ..."):
        report = run_speed_bench(device, lens, quick, output_dir, attn)
    console.print(report.read_text())
    console.print(f"[green]wrote[/] {report.parent}")


@bench_app.command("counts")
def counts(
    seq_len: int = typer.Option(2048, "--seq-len", help="Training sequence length for the FLOP count."),
    output_dir: Path = typer.Option(
        Path("eval/results/perf"), "--output-dir", help="Where counts.json and counts.md go."
    ),
) -> None:
    """FLOPs per training token, kernels per decode step and bytes at Qwen2.5 0.5B/1.5B/7B shapes.

    Hardware-independent (meta device and a small stand-in; seconds on a CPU): each ratio to the
    base model is the best tokens/s ratio that regime allows on any GPU.
    """
    from rich.console import Console

    from ..bench.counts import count_all, write_counts

    if seq_len < 1:
        raise typer.BadParameter(f"--seq-len must be a positive integer, got {seq_len}")
    console = Console()
    with console.status("counting ..."):
        report = write_counts(count_all(seq_len), output_dir, seq_len)
    console.print(report.read_text())
    console.print(f"[green]wrote[/] {report.parent}")
