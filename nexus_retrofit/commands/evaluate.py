"""`nexus-retrofit eval`, `compare` and `grade`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import fail

console = Console(stderr=True)


def _load_task_files(task_files: list[Path] | None) -> None:
    from ..evaluation.tasks import load_task_file

    for path in task_files or []:
        load_task_file(path)


def eval_command(
    model: str = typer.Argument(..., help="Model: a local checkpoint folder or a Hub id."),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Comma-separated task names (default: the suite's); lm-eval's names run zero-shot.",
    ),
    suite: str = typer.Option(
        None,
        "--suite",
        help="generative (math_500, aime24, gpqa_diamond; the default) or zero-shot (lm-eval: arc_challenge, "
        "arc_easy, hellaswag, logiqa, piqa, sciq).",
    ),
    task_dirs: list[Path] = typer.Option(
        None, "--task-dir", help="Folder of lm-eval task YAMLs for zero-shot tasks (repeatable)."
    ),
    backend: str = typer.Option(
        None, "--backend", help="vllm (default when installed; zero-shot: hf) or hf (transformers, CPU ok)."
    ),
    num_samples: int = typer.Option(
        None, "--num-samples", help="Samples per problem (default per task: 4, 64, 8)."
    ),
    temperature: float = typer.Option(0.6, "--temperature", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold."),
    max_new_tokens: int = typer.Option(32768, "--max-new-tokens", help="Generation budget per sample."),
    seed: int = typer.Option(1234, "--seed", help="Seeds the samples and the GPQA choice shuffle."),
    limit: int = typer.Option(None, "--limit", help="Only the first N problems of each task."),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Problems per generate call (hf: 8, vllm: all)."
    ),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message (default none)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Offline data: DIR/<task>.jsonl or .parquet."),
    output_dir: Path = typer.Option(
        None, "--output-dir", help="Where results.json and samples go (default eval/<model>)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run of another configuration in --output-dir."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    revision: str = typer.Option(None, "--revision", help="Model revision on the Hub."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model's own code (off; not needed for Nexus checkpoints)."
    ),
    no_chat_template: bool = typer.Option(
        False, "--no-chat-template", help="Send the bare prompt (base models)."
    ),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="vLLM: GPUs per engine."
    ),
    data_parallel_size: int = typer.Option(
        1, "--data-parallel-size", "--dp", help="vLLM: engines (each on its own GPUs)."
    ),
    max_model_len: int = typer.Option(None, "--max-model-len", help="vLLM: context length cap."),
    gpu_memory_utilization: float = typer.Option(
        None, "--gpu-memory-utilization", help="vLLM: fraction of GPU memory."
    ),
    task_files: list[Path] = typer.Option(
        None, "--task-file", help="YAML/JSON file defining extra tasks (repeatable)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Score MODEL on MATH-500, AIME24, GPQA-Diamond, or zero-shot through lm-eval; resumable, reproducible."""
    from ..evaluation.backends import BackendError
    from ..evaluation.runner import EvalSettings, evaluate
    from ..evaluation.tasks import list_tasks
    from ..evaluation.zero_shot import ZERO_SHOT, ZeroShotSettings, evaluate_zero_shot, route

    try:
        _load_task_files(task_files)
        given = {
            "--num-samples": num_samples is not None, "--temperature": temperature != 0.6,
            "--top-p": top_p != 0.95, "--max-new-tokens": max_new_tokens != 32768,
            "--system-prompt": system_prompt is not None, "--data-dir": data_dir is not None,
            "--no-chat-template": no_chat_template, "--task-file": bool(task_files),
        }  # fmt: skip
        wrong = [k for k, v in given.items() if v]  # options of generative runs only
        kind, names = route(
            suite, _names(tasks), [str(d) for d in task_dirs or []], list_tasks(), bool(wrong)
        )
        out = output_dir or Path("eval") / (Path(model.rstrip("/")).name or "model")
        if kind == ZERO_SHOT:
            if wrong:
                raise ValueError(
                    f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for generative tasks only; "
                    "zero-shot tasks are scored by lm-eval's log-likelihoods (their YAMLs say the prompts): "
                    f"drop {'it' if len(wrong) == 1 else 'them'}"
                )
            results = evaluate_zero_shot(
                ZeroShotSettings(
                    model=model, tasks=names, backend=backend or "hf", limit=limit, batch_size=batch_size,
                    seed=seed, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                    task_dirs=tuple(str(d) for d in task_dirs or []),
                    tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                    max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                ),
                out,
                overwrite=overwrite,
            )  # fmt: skip
            _print_zero_shot_summary(results, out)
            return
        settings = EvalSettings(
            model=model,
            tasks=names,
            backend=backend,
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            limit=limit,
            batch_size=batch_size,
            system_prompt=system_prompt,
            data_dir=str(data_dir) if data_dir else None,
            dtype=dtype,
            use_chat_template=not no_chat_template,
            trust_remote_code=trust_remote_code,
            revision=revision,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        if backend not in (None, "hf", "vllm"):
            raise ValueError(f"--backend must be vllm or hf, got {backend!r}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        results = evaluate(settings, out, overwrite=overwrite, show_progress=not no_progress)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/]: rerun the same command to resume from the samples written so far"
        )
        raise typer.Exit(code=130) from None
    except (ValueError, FileNotFoundError, BackendError) as e:
        raise fail(str(e)) from None
    _print_summary(results, out)


def _names(tasks: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks is not None else None


def _print_summary(results: dict, out: Path) -> None:
    table = Table(title=f"{results['model']['path']}", title_justify="left")
    for column in ("task", "pass@1 (%)", "± se", "problems", "samples", "extraction failures"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, t in results["tasks"].items():
        if "pass@1" in t:
            table.add_row(
                name,
                f"{100 * t['pass@1']:.1f}",
                f"{100 * t['stderr']:.1f}",
                str(t.get("n_problems", "?")),  # an older or hand-edited results.json may lack them
                str(t.get("n_samples", "?")),
                f"{t.get('extraction_failures', '?')} ({100 * t.get('extraction_failure_rate', float('nan')):.1f}%)",
            )
    Console().print(table)
    console.print(f"wrote {out / 'results.json'}")


def _print_zero_shot_summary(results: dict, out: Path) -> None:
    table = Table(title=f"{results['model']['path']} (zero-shot, lm-eval)", title_justify="left")
    for column in ("task", "acc (%)", "± se", "acc_norm (%)", "± se ", "documents"):
        table.add_column(column, justify="left" if column == "task" else "right")

    def pct(value: object) -> str:
        return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "–"

    for name, t in results["tasks"].items():
        if "acc" in t:
            row = [t.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")]
            table.add_row(name, *map(pct, row), str(t.get("n_problems", "?")))
    Console().print(table)
    console.print(f"wrote {out / 'results.json'}")


def compare_command(
    results: list[Path] = typer.Argument(
        ..., help="results.json files (or their folders); the first is the baseline."
    ),
    labels: str = typer.Option(
        None, "--labels", help="Comma-separated row labels (default: model folder names)."
    ),
    plot: Path = typer.Option(None, "--plot", help="Also write a bar chart PNG to this path."),
    allow_mismatch: bool = typer.Option(
        False,
        "--allow-mismatch",
        help="Print the table even when the runs' settings differ (marked with a warning).",
    ),
) -> None:
    """Markdown table of pass@1 with deltas against the first run (the paper's Table 3 layout).

    Runs whose settings differ (sampling, limits, sample counts, data, grader) are refused unless
    --allow-mismatch, which prints the table under a warning naming the differences."""
    from ..evaluation.compare import (
        compare_table,
        default_label,
        load_results,
        plot_comparison,
        settings_mismatches,
    )
    from ..safe_output import check_output_path

    try:
        if plot is not None:
            check_output_path(plot, "--plot")  # before any work: not a folder, not under a file
        runs = [load_results(p) for p in results]
        names = (
            [s.strip() for s in labels.split(",")]
            if labels
            else [default_label(r, p) for r, p in zip(runs, results)]
        )
        if len(names) != len(runs):
            raise ValueError(f"--labels has {len(names)} names for {len(runs)} results files")
        mismatches = settings_mismatches(runs, names)
        if mismatches and not allow_mismatch:
            raise ValueError(
                f"the runs used different settings, so their deltas are not comparable: {'; '.join(mismatches)}. "
                "Re-run them alike, or pass --allow-mismatch to print the table with a warning"
            )
        if mismatches:
            console.print(
                f"[bold yellow]warning:[/] settings differ: {'; '.join(mismatches)}", highlight=False
            )
        typer.echo(compare_table(runs, names, mismatches))
        if plot is not None:
            console.print(f"wrote {plot_comparison(runs, names, plot)}")
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise fail(str(e)) from None


def grade_command(
    task: str = typer.Argument(..., help="Task whose grader to use (math_500, aime24, gpqa_diamond, ...)."),
    samples: Path = typer.Argument(..., help="JSONL with at least `completion` and `gold` per line."),
    as_json: bool = typer.Option(False, "--json", help='Print {"accuracy": ..., "correct": [...]} only.'),
    task_files: list[Path] = typer.Option(None, "--task-file", help="YAML/JSON file defining extra tasks."),
) -> None:
    """Re-grade saved completions without a model (graders change; old generations stay scorable)."""
    from ..evaluation.runner import grade_samples

    try:
        _load_task_files(task_files)
        if not samples.is_file():
            raise FileNotFoundError(f"no samples file at {samples}")
        records = []
        for number, raw in enumerate(samples.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
                record = json.loads(line) if line.strip() else None
            except UnicodeDecodeError:
                raise ValueError(
                    f"{samples} line {number} is not UTF-8 text; re-save the file as UTF-8"
                ) from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{samples} line {number} is not valid JSON: {e.msg}") from None
            if record is None:
                continue
            if not isinstance(record, dict):
                raise ValueError(
                    f"{samples} line {number} is a JSON {type(record).__name__}, not an object with "
                    "'completion' and 'gold'"
                )
            records.append(record)
        if not records:
            raise ValueError(f"{samples} has no lines to grade")
        try:
            accuracy, correct, extracted = grade_samples(task, records)
        except ValueError as e:
            raise ValueError(f"{samples}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps({"accuracy": accuracy, "correct": correct}))
        return
    for i, (ok, answer, record) in enumerate(zip(correct, extracted, records), 1):
        verdict = "correct" if ok else ("no answer" if answer is None else "wrong")
        typer.echo(f"{i}\t{verdict}\textracted={answer!r}\tgold={record['gold']!r}")
    failures = sum(a is None for a in extracted)
    typer.echo(f"accuracy {accuracy:.4f} ({sum(correct)}/{len(correct)}), extraction failures {failures}")
