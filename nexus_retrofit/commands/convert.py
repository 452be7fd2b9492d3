"""`nexus-retrofit convert` and `nexus-retrofit inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from ..modeling.configuration_nexus import MAX_ORDER  # one limit for the CLI and NexusConfig
from . import fail, one_line

if TYPE_CHECKING:
    from ..modeling import NexusConfig

console = Console(stderr=True)


def convert(
    source: str = typer.Argument(..., help="Base model: a local folder or a Hugging Face Hub id."),
    output: Path = typer.Argument(..., help="Folder to write the Nexus checkpoint to."),
    order: int = typer.Option(
        2, "--order", help=f"Attention order m, 1..{MAX_ORDER} (1 = standard attention)."
    ),
    proj: str = typer.Option("qk", "--proj", help="Refined projections: q, qk or qkv."),
    inner: str = typer.Option(
        "separate",
        "--inner",
        help="Inner attention: separate, shared or self (or mlp, the token-wise control of the experiments).",
    ),
    gate: str = typer.Option(
        None,
        "--gate",
        help="open (path on at 1), zero (path off at 0) or none (the paper's form); default: open for "
        "separate with --inner-init zero_out, else zero.",
    ),
    inner_init: str = typer.Option(
        None,
        "--inner-init",
        help="zero_out (inner o_proj at 0: exact with --gate open), random or copy; default: zero_out "
        "with an open gate, else random.",
    ),
    gate_shape: str = typer.Option("channel", "--gate-shape", help="One gate per channel, head, or scalar."),
    gate_fn: str = typer.Option("identity", "--gate-fn", help="identity or tanh (bounded gate)."),
    gate_lr_multiplier: float = typer.Option(
        None, "--gate-lr-multiplier", hidden=True, help="Moved to the recipe (nexus.gate_lr_multiplier)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    seed: int = typer.Option(0, "--seed", help="Seed for the new inner weights."),
    streaming: bool = typer.Option(
        None,
        "--streaming/--no-streaming",
        help="Reuse SOURCE's safetensors shards (copied byte for byte) and write only the new "
        "parameters: peak memory is about one shard, not the model; same result. Default: on when "
        "SOURCE's safetensors exceed 4 GiB or half the available RAM.",
    ),
    revision: str = typer.Option(None, "--revision", help="Hub revision of SOURCE."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow SOURCE's own code (off)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an OUTPUT folder written by an earlier nexus-retrofit run."
    ),
) -> None:
    """Convert a Qwen2/Qwen2.5/Qwen3/Llama/Mistral checkpoint to Nexus attention."""
    import torch
    from safetensors import SafetensorError

    from ..checkpoint import load_causal_lm, pin_revision, save_tokenizer_files, torch_dtype
    from ..converter import convert as convert_model
    from ..modeling import NexusConfig
    from ..safe_output import atomic_dir, check_output_dir

    try:  # validate everything before loading gigabytes
        if gate_lr_multiplier is not None:
            raise ValueError(
                "--gate-lr-multiplier is a training setting, not part of the checkpoint: set "
                "nexus.gate_lr_multiplier in the training recipe (or --nexus.gate_lr_multiplier)"
            )
        settings = NexusConfig(
            order=order,
            projections=proj,
            inner=inner,
            gate=gate,
            inner_init=inner_init,
            gate_shape=gate_shape,
            gate_fn=gate_fn,
        )
        check_output_dir(output, overwrite, flag="OUTPUT")
        torch_dtype(dtype)
        revision = pin_revision(source, revision)  # one commit for config, weights and tokenizer
        _check_source(source, revision)
    except (ValueError, OSError) as e:  # OSError includes huggingface_hub's errors: several lines each
        raise fail(one_line(e)) from None

    if streaming if streaming is not None else _should_stream(source, revision):
        _convert_streaming(source, output, settings, seed, dtype, revision, trust_remote_code, overwrite)
        return
    with console.status(f"loading {source} ..."):
        try:
            model = load_causal_lm(source, dtype, trust_remote_code, revision)
        except (OSError, ValueError, SafetensorError) as e:
            raise fail(f"could not load {source}: {one_line(e)}") from None
    torch.manual_seed(seed)
    try:
        model = convert_model(model, settings)
    except (ValueError, TypeError) as e:
        raise fail(str(e)) from None
    with console.status(f"writing {output} ..."), atomic_dir(output, overwrite, "convert") as tmp:
        model.save_pretrained(tmp)
        has_tokenizer = save_tokenizer_files(source, tmp, revision)
    console.print(f"[green]wrote[/] {output} ({type(model).__name__}, {settings})")
    if not has_tokenizer:
        console.print("[yellow]note:[/] the source has no tokenizer files; none were copied")
    _print_inspection(output)


def _should_stream(source: str, revision: str | None) -> bool:
    from ..streaming import should_stream

    return should_stream(source, revision)


def _convert_streaming(
    source: str,
    output: Path,
    settings: NexusConfig,
    seed: int,
    dtype: str,
    revision: str | None,
    trust_remote_code: bool,
    overwrite: bool,
) -> None:
    """convert without loading SOURCE (nexus_retrofit.streaming): its shards reused, new ones written."""
    from safetensors import SafetensorError

    from ..checkpoint import save_tokenizer_files
    from ..safe_output import atomic_dir
    from ..streaming import convert_streaming

    with console.status(f"streaming {source} ..."), atomic_dir(output, overwrite, "convert") as tmp:
        try:
            result = convert_streaming(source, tmp, settings, seed, dtype, revision, trust_remote_code)
        except (OSError, ValueError, SafetensorError) as e:
            raise fail(f"could not convert {source}: {one_line(e)}") from None
        has_tokenizer = save_tokenizer_files(source, tmp, revision)
    console.print(
        f"[green]wrote[/] {output} ({result.architecture}, {settings}; streamed: source shards "
        f"{len(result.copied)} copied, {len(result.rewritten)} rewritten; "
        f"{result.nexus_bytes / 2**20:.1f} MiB of new parameters)"
    )
    if not has_tokenizer:
        console.print("[yellow]note:[/] the source has no tokenizer files; none were copied")
    _print_inspection(output)


def _check_source(source: str, revision: str | None) -> None:
    """SOURCE's config.json (and local safetensors headers) without loading weights."""
    from ..checkpoint import check_config_dict, check_safetensors, read_source_config

    check_config_dict(read_source_config(source, revision), source)
    if Path(source).expanduser().is_dir():
        check_safetensors(Path(source).expanduser())


def inspect(
    path: Path = typer.Argument(..., help="A checkpoint folder (Nexus or base)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, Nexus settings, parameters, attention calls and KV-cache cost of a checkpoint."""
    try:
        _print_inspection(path, as_json)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None


def _print_inspection(path: Path, as_json: bool = False) -> None:
    from ..inspection import inspect_checkpoint, inspection_json

    report = inspect_checkpoint(path)
    if as_json:
        print(inspection_json(report))
        return
    table = Table(title=f"{report.architecture}  ({report.path})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model type", report.model_type)
    table.add_row("nexus", str(report.nexus) if report.nexus else "not a Nexus model")
    table.add_row(
        "layout",
        f"{report.num_layers} layers, hidden {report.hidden_size}, {report.num_heads} heads, "
        f"{report.num_kv_heads} KV heads, head_dim {report.head_dim}",
    )
    if report.params_total is not None:
        added_pct = 100 * report.params_added / max(report.params_base, 1)
        table.add_row(
            "parameters",
            f"{report.params_total:,} total = {report.params_base:,} base + "
            f"{report.params_added:,} Nexus ({added_pct:.2f}%)",
        )
    table.add_row(
        "attention calls / layer",
        f"{report.distinct_attention_calls} distinct (paper counts {report.paper_attention_calls}), "
        f"run as {report.kernel_calls} fused kernel call(s)",
    )
    slots = ", ".join(f"{s.name} ({s.kv_heads} heads)" for s in report.cache_slots)
    table.add_row("KV cache / layer", slots)
    per_token = report.cache_bytes_per_token("bfloat16")
    table.add_row(
        "KV cache size",
        f"{report.cache_ratio:.2f}x the base model; {per_token / 1024:.1f} KiB/token in bf16, "
        f"{per_token * 32768 / 2**30:.2f} GiB for one 32k-token sequence",
    )
    table.add_row(
        "transformers",
        f"written with {report.written_with_transformers or 'not recorded'}; bundled code tested on "
        f"{report.code_tested_on_transformers or 'not recorded (written before nexus-retrofit recorded it)'}",
    )
    Console().print(table)
