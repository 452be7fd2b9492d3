"""`nexus-retrofit bench speed`: Nexus vs base model speed and memory (see nexus_retrofit.bench)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

from . import fail

# results go to an untracked folder by default: a run from the repo root must not replace the
# committed numbers (pass --output-dir eval/results/perf --overwrite to update those on purpose)
DEFAULT_DIR = Path("runs/perf")
COMMITTED_DIR = "eval/results/perf"

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
        DEFAULT_DIR, "--output-dir", help=f"Where JSON/markdown/PNG go (committed results: {COMMITTED_DIR})."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --output-dir."),
) -> None:
    """One attention layer and the whole model, base vs Nexus variants (orders 2 and 3)."""
    from rich.console import Console

    from ..bench.speed import run_speed_bench
    from ..safe_output import sigterm_as_interrupt

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("--device must be cpu or cuda")
    try:
        lens = [int(s) for s in seq_lens.split(",")] if seq_lens else None
    except ValueError:
        raise typer.BadParameter(f"--seq-lens must be comma-separated integers, got {seq_lens!r}") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise fail(
                "--device cuda: no CUDA GPU is visible to torch; run on a GPU machine or use --device cpu"
            )
    names = [f"speed_{device}.{ext}" for ext in ("json", "md", "png")]
    console = Console()
    with (
        _outputs(output_dir, names, overwrite, "bench speed"),
        console.status("benchmarking ..."),
        sigterm_as_interrupt(),
    ):
        report = run_speed_bench(device, lens, quick, output_dir, attn)
    console.print(report.read_text())
    console.print(f"[green]wrote[/] {report.parent}")


@bench_app.command("counts")
def counts(
    seq_len: int = typer.Option(2048, "--seq-len", help="Training sequence length for the FLOP count."),
    output_dir: Path = typer.Option(
        DEFAULT_DIR, "--output-dir", help=f"Where counts.json and counts.md go (committed: {COMMITTED_DIR})."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --output-dir."),
) -> None:
    """FLOPs per training token, kernels per decode step and bytes at Qwen2.5 0.5B/1.5B/7B shapes.

    Hardware-independent (meta device and a small stand-in; seconds on a CPU): each ratio to the
    base model is the best tokens/s ratio that regime allows on any GPU.
    """
    from rich.console import Console

    from ..bench.counts import count_all, write_counts
    from ..safe_output import sigterm_as_interrupt

    if seq_len < 1:
        raise typer.BadParameter(f"--seq-len must be a positive integer, got {seq_len}")
    console = Console()
    names = ["counts.json", "counts.md"]
    with (
        _outputs(output_dir, names, overwrite, "bench counts"),
        console.status("counting ..."),
        sigterm_as_interrupt(),
    ):
        report = write_counts(count_all(seq_len), output_dir, seq_len)
    console.print(report.read_text())
    console.print(f"[green]wrote[/] {report.parent}")


@bench_app.command("gpu")
def gpu(
    dry_run: bool = typer.Option(False, "--dry-run", help="Tiny shapes on the CPU, no vLLM (what CI runs)."),
    output_dir: Path = typer.Option(Path("runs/gpu_check"), "--output-dir", help="Where the reports go."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --output-dir."),
    budget_s: float = typer.Option(560, "--budget-s", help="Time box of the whole run, in seconds."),
) -> None:
    """Parity (SDPA/FlashAttention-2, padded and packed), SFT and decode speed, vLLM: one GPU, <= 10 min."""
    from ..bench.gpu_check import Settings, run_gpu_check

    device = "cpu" if dry_run else "cuda"
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            raise fail("no CUDA GPU is visible to torch; run on a GPU machine or pass --dry-run")
    names = ["gpu_check.json", "gpu_check.md"] + [
        f"speed/speed_{device}.{ext}" for ext in ("json", "md", "png")
    ]
    with _outputs(output_dir, names, overwrite, "bench gpu"):
        report = run_gpu_check(
            output_dir, Settings(device, small=dry_run, vllm=not dry_run), total_s=budget_s
        )
    print(report.read_text())


@bench_app.command("streaming")
def streaming(
    layers: int = typer.Option(
        28, "--layers", help="Layers of the synthetic Qwen2.5-1.5B-shaped checkpoint."
    ),
    shard_gib: float = typer.Option(1.0, "--shard-gib", help="Shard size of the synthetic checkpoint."),
    output_dir: Path = typer.Option(DEFAULT_DIR, "--output-dir", help="Where streaming.json/md go."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier results in --output-dir."),
) -> None:
    """convert in memory vs --streaming on a synthetic multi-GB sharded checkpoint: peak RSS and time.

    Writes the checkpoint (3 GB at the defaults) and both outputs under --output-dir, then removes them.
    """
    from rich.console import Console

    from ..bench.streaming import run_streaming_bench
    from ..safe_output import sigterm_as_interrupt

    if layers < 1 or shard_gib <= 0:
        raise typer.BadParameter("--layers and --shard-gib must be positive")
    with (
        _outputs(output_dir, ["streaming.json", "streaming.md"], overwrite, "bench streaming"),
        sigterm_as_interrupt(),
    ):
        report = run_streaming_bench(output_dir, layers, shard_gib)
    Console().print(report.read_text())


@contextlib.contextmanager
def _outputs(output_dir: Path, names: list[str], overwrite: bool, command: str) -> Iterator[None]:
    """Path, ownership and replace checks before any work, the folder's lock while writing, and the
    files claimed as the tool's afterwards (see nexus_retrofit.safe_output)."""
    from ..safe_output import OutputError, writing_files

    try:
        with writing_files(output_dir, names, overwrite, command):
            yield
    except OutputError as e:
        raise fail(str(e)) from None
