"""The end-to-end demo: convert -> SFT (baseline and Nexus, same recipe) -> eval -> Table 3 in miniature.

Runs on the embedded tiny Qwen2 on a laptop CPU in minutes, through the same code paths a user
runs on Qwen2.5-7B: `convert`, `train` (TRL SFTTrainer), `eval` (the harness, hf backend, graded by
math-verify). Whatever the table shows is what the run measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..safe_output import (
    atomic_write_text,
    claim,
    mark_dir,
    output_lock,
    owned_and_foreign,
    prepare_output_dir,
    save_figure,
    sigterm_as_interrupt,
)
from .arithmetic import MATH_PROMPT, read_jsonl, write_jsonl
from .assets import eval_data_path, sft_data_path, tiny_model_path

console = Console(stderr=True)

# The demo's SFT recipe; baseline and Nexus share every line but the model they start from.
# Sized by docs/DESIGN.md §9: lr 1e-4 (5e-4 caused forgetting), batch 16, completion-only loss.
RECIPE: dict[str, Any] = {
    "learning_rate": 1.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "max_steps": 200,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "max_length": 256,
    "packing": False,
    "bf16": False,  # measured here: bf16 autocast was slower than fp32 for a model this small
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "dataloader_num_workers": 0,
}
# gate open + inner o_proj at 0: exactly the base model at step 0, and the path trains from step one
# (a zero gate stayed at |g| ~ 4e-4 here; eval/results/experiments/retrofit/README.md).
NEXUS = {"order": 2, "projections": "qk", "inner": "separate", "gate": "open", "inner_init": "zero_out"}
# How the Nexus arm's new parameters train (the recipe's `nexus:` block on the converted model): the
# inner modules at 3x the learning rate, the gates at 1x. Measured at this recipe (200 steps, 1000 held-out
# problems): x1 left the path at 0.3-0.9% of ||X||; x3 1-2% with 46/1000 completions changed and accuracy
# +0.4 +- 0.5 points; x10 3-5% but 2-step -1.2 +- 0.7; x30 -5.4 +- 1.5 on 1-step
# (eval/results/experiments/retrofit/README.md).
NEXUS_TRAINING: dict[str, Any] = {"inner_lr_multiplier": 3.0, "gate_lr_multiplier": 1.0}
LEVEL_TASKS = {1: "arith_1step", 2: "arith_2step"}


@dataclass
class ModelRow:
    name: str
    path: str
    accuracy: dict[str, float] = field(default_factory=dict)  # task -> pass@1
    stderr: dict[str, float] = field(default_factory=dict)
    eval_tokens_per_second: float | None = None
    train_seconds: float | None = None
    train_tokens_per_second: float | None = None
    final_loss: float | None = None
    # Nexus only: ||f(g_p) Inner_p(X)|| / ||X|| per refined projection p (mean over layers) and mean
    # |f(g)|, as the trainer logged them on the last logging step: how much signal the new path carries.
    nexus_path: dict[str, float] | None = None
    gate_abs_mean: float | None = None


def _prepare_data(out: Path, limit: int | None) -> dict[str, Path]:
    """SFT rows as prompt/completion (completion-only loss); eval rows split by level into tasks."""
    sft_rows = [
        {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
        for row in read_jsonl(sft_data_path())
    ]
    paths = {"sft": write_jsonl(sft_rows, out / "data" / "sft.jsonl")}
    rows = read_jsonl(eval_data_path())
    for level, task in LEVEL_TASKS.items():
        picked = [r for r in rows if int(r["level"]) == level][:limit]
        paths[task] = write_jsonl(picked, out / "data" / f"{task}.jsonl")
    return paths


def _register_tasks(paths: dict[str, Path]) -> None:
    from ..evaluation import Task, register_task

    prompt = MATH_PROMPT + "{problem}"  # exactly what the model saw in pretraining and SFT
    for task in LEVEL_TASKS.values():
        register_task(
            Task(
                name=task,
                dataset=str(paths[task]),
                split="test",
                prompt=prompt,
                grader="math",
                num_samples=1,
                columns={"problem": "problem", "answer": "answer", "solution": "solution", "id": "unique_id"},
                description="held-out arithmetic word problems (demo)",
            ),
            overwrite=True,
        )


def _convert(source: Path, target: Path) -> float:
    """Convert the tiny model; return the max |logit difference| to the source (0 with gate=zero)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import save_tokenizer_files
    from ..converter import convert
    from ..modeling import NexusConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(["Ana has 7 apples and buys 5 more."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits
        nexus = convert(model, NexusConfig(**NEXUS)).eval()
        diff = (nexus(ids).logits - reference).abs().max().item()
    nexus.save_pretrained(target)
    save_tokenizer_files(str(source), target)
    return diff


def _train(
    name: str, model_path: Path, data: Path, out: Path, max_steps: int, nexus: dict[str, Any] | None = None
) -> tuple[ModelRow, list]:
    import torch

    from ..train import run_training

    recipe = {
        **RECIPE,
        "use_cpu": not torch.cuda.is_available(),
        "max_steps": max_steps,
        "logging_steps": max(1, min(RECIPE["logging_steps"], max_steps // 10)),
        "model_name_or_path": str(model_path),
        "dataset_name": str(data),
        "output_dir": str(out / "runs" / name),
        "dtype": "float32",
        **({"nexus": nexus} if nexus else {}),
    }
    console.rule(f"[bold]SFT: {name}")
    result = run_training(recipe)
    losses = result.losses
    path, gate = _path_strength(result.log_history)
    return ModelRow(
        name=name,
        path=str(result.output_dir),
        train_seconds=result.train_runtime,
        train_tokens_per_second=result.tokens_per_second,
        final_loss=losses[-1][1] if losses else None,
        nexus_path=path,
        gate_abs_mean=gate,
    ), losses


def _path_strength(log_history: list[dict[str, Any]]) -> tuple[dict[str, float] | None, float | None]:
    """The last logged path strength per projection and mean |f(g)| (None, None for a plain model)."""
    logged = [e for e in log_history if any(k.startswith("nexus_path_") for k in e)]
    if not logged:
        return None, None
    last = logged[-1]
    path = {k.removeprefix("nexus_path_"): float(v) for k, v in last.items() if k.startswith("nexus_path_")}
    return path, last.get("nexus_gate_abs_mean")


def _compare_outputs(out: Path, base: str, other: str) -> dict[str, dict[str, Any]]:
    """Per task: how many greedy completions of `other` differ from `base`'s, and the paired accuracy
    difference with its standard error (from the eval harness's samples files)."""
    from ..evaluation.samples import read_samples, samples_path
    from .scoring import paired_comparison

    comparison = {}
    for task in LEVEL_TASKS.values():
        sides = [
            read_samples(samples_path(out / "eval" / name, task), 1, repair=False) for name in (base, other)
        ]
        common = sorted(set(sides[0]) & set(sides[1]))
        comparison[task] = paired_comparison(
            [sides[0][i][0] for i in common], [sides[1][i][0] for i in common]
        )
    return comparison


def _findings(nexus: ModelRow, comparison: dict[str, dict[str, Any]]) -> list[str]:
    """The summary's plain answer: does the Nexus path carry signal, do outputs differ, is it better."""
    lines = []
    if nexus.nexus_path:
        per = ", ".join(f"{p} {100 * v:.2f}%" for p, v in nexus.nexus_path.items())
        gate = "–" if nexus.gate_abs_mean is None else f"{nexus.gate_abs_mean:.4f}"
        lines.append(
            f"- Nexus path strength after SFT (||f(g) Inner_p(X)|| / ||X||, mean over layers): {per}; "
            f"mean |f(g)| {gate}."
        )
    for task, c in comparison.items():
        lines.append(
            f"- {task}: greedy completions differ from the baseline's on {c['differ']} of {c['n']} problems; "
            f"accuracy nexus − baseline {100 * c['difference']:+.1f} ± {100 * c['difference_stderr']:.1f} points "
            f"(paired standard error): {c['verdict']}."
        )
    return lines


def _evaluate(row: ModelRow, out: Path) -> None:
    from ..evaluation import EvalSettings, evaluate

    console.rule(f"[bold]eval: {row.name}")
    settings = EvalSettings(
        model=row.path,
        tasks=tuple(LEVEL_TASKS.values()),
        backend="hf",
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=96,
        num_samples=1,
        batch_size=100,
        seed=0,
        dtype="float32",
    )
    results = evaluate(settings, out / "eval" / row.name, overwrite=True)
    tokens = seconds = 0.0
    for task, entry in results["tasks"].items():
        row.accuracy[task] = entry["pass@1"]
        row.stderr[task] = entry["stderr"]
        tokens += entry.get("throughput", {}).get("generated_tokens", 0)
        seconds += entry.get("throughput", {}).get("generation_seconds", 0.0)
    row.eval_tokens_per_second = tokens / seconds if seconds else None


def _table(rows: list[ModelRow]) -> str:
    def pct(row: ModelRow, task: str) -> str:
        return f"{100 * row.accuracy[task]:.1f} ± {100 * row.stderr[task]:.1f}"

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        "| model | 1-step acc (%) | 2-step acc (%) | eval tokens/s | SFT time (s) | SFT tokens/s | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {pct(r, 'arith_1step')} | {pct(r, 'arith_2step')} | "
            f"{num(r.eval_tokens_per_second, '.0f')} | {num(r.train_seconds, '.0f')} | "
            f"{num(r.train_tokens_per_second, '.0f')} | {num(r.final_loss, '.3f')} |"
        )
    return "\n".join(lines)


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot([s for s, _ in losses], [loss for _, loss in losses], label=name)
    ax.set(xlabel="step", ylabel="training loss (completion tokens)", title="Demo SFT: baseline vs Nexus")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_demo(
    output_dir: Path,
    overwrite: bool = False,
    max_steps: int = RECIPE["max_steps"],
    eval_limit: int | None = None,
) -> Path:
    """Run the whole demo into `output_dir`; return the path of its markdown summary.

    The folder is written in place (its checkpoints' paths are recorded in the eval results and the
    summary), marked as the demo's from the start, so `--overwrite` can later replace it, and only it.
    """
    with output_lock(output_dir, "demo", "--output-dir"):
        prepare_output_dir(output_dir, overwrite, "demo")  # OutputError before any work; keeps paths as given
        theirs = set(owned_and_foreign(output_dir)[1])  # entries of the user's that an --overwrite left
        try:
            with sigterm_as_interrupt():
                summary = _run_demo(output_dir, max_steps, eval_limit)
        finally:  # what the demo wrote is the demo's, even when it was interrupted
            claim(output_dir, [p.name for p in output_dir.iterdir() if p.name not in theirs], "demo")
        mark_dir(output_dir, "demo", complete=True)
    return summary


def _run_demo(output_dir: Path, max_steps: int, eval_limit: int | None) -> Path:
    started = time.perf_counter()

    paths = _prepare_data(output_dir, eval_limit)
    _register_tasks(paths)
    base = tiny_model_path()
    console.rule("[bold]convert")
    nexus_init = output_dir / "nexus-init"
    diff = _convert(base, nexus_init)
    console.print(f"converted {base.name} -> {nexus_init} ({NEXUS}); max |logit diff| vs source: {diff:.2e}")

    pretrained = ModelRow(name="pretrained (no SFT)", path=str(base))
    baseline, baseline_losses = _train("baseline-sft", base, paths["sft"], output_dir, max_steps)
    nexus, nexus_losses = _train("nexus-sft", nexus_init, paths["sft"], output_dir, max_steps, NEXUS_TRAINING)
    rows = [pretrained, baseline, nexus]
    for row in rows:
        _evaluate(row, output_dir)
    comparison = _compare_outputs(output_dir, baseline.name, nexus.name)
    findings = _findings(nexus, comparison)
    for line in findings:
        console.print(line)

    _plot(
        {"baseline SFT": baseline_losses, "Nexus SFT (separate, QK, order 2)": nexus_losses},
        output_dir / "loss_curves.png",
    )
    table = _table(rows)
    elapsed = time.perf_counter() - started
    summary = [
        "# nexus-retrofit demo: baseline SFT vs Nexus SFT (the paper's Table 3, in miniature)",
        "",
        f"Tiny Qwen2 ({base.name}), converted with {NEXUS} (max |logit diff| after conversion: {diff:.2e}); "
        f"both SFT runs share one recipe: "
        f"{json.dumps({k: RECIPE[k] for k in ('learning_rate', 'per_device_train_batch_size')})}, {max_steps} steps; "
        f"the Nexus run's new parameters train with {NEXUS_TRAINING}. Held-out problems, greedy, graded by "
        "math-verify (pass@1 ± standard error).",
        "",
        table,
        "",
        "Nexus vs baseline:",
        "",
        *findings,
        "",
        f"Loss curves: loss_curves.png. Total time: {elapsed / 60:.1f} min.",
        "",
    ]
    atomic_write_text(output_dir / "summary.md", "\n".join(summary))
    atomic_write_text(
        output_dir / "summary.json",
        json.dumps(
            {
                "nexus": NEXUS,
                "nexus_training": NEXUS_TRAINING,
                "recipe": {**RECIPE, "max_steps": max_steps},
                "conversion_max_logit_diff": diff,
                "rows": [asdict(r) for r in rows],
                "nexus_vs_baseline": comparison,
                "curves": {"baseline": baseline_losses, "nexus": nexus_losses},
                "seconds": elapsed,
            },
            indent=2,
        ),
    )
    return output_dir / "summary.md"
