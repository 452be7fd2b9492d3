"""Experiment `scratch`: the paper's Tables 1-2 in miniature — Nexus trained from scratch, zero-shot.

Tiny GPT-NeoX models (the Pythia family, partial rotary) are built by `nexus_retrofit.init_from_config`
(the `init` command: baseline and Nexus share every base tensor for a seed), pretrained by
`nexus_retrofit.train.run_training` (the `train` command, TRL's SFTTrainer on packed plain text) with
the Pythia recipe's optimiser scaled down (AdamW betas 0.9/0.95, eps 1e-8, weight decay 0.1, cosine to
10% after a 1% warm-up, gradient clip 1.0; recipes/Pythia-70M/pretrain/) on the corpus of
`scratch_world.py`, and scored zero-shot by lm-evaluation-harness on that world's six multiple-choice
tasks, in the formats of the paper's six (three ask a fact the corpus states, three need two composed).

Rows (Table 2's ablation, plus a control the paper does not have): the baseline; Nexus-Q, -QK, -QKV
(separate inner attention, order 2); -QK-shared; -QK-shared order 3; and the token-wise MLP control
(inner="mlp": X_q, X_k = MLP(X), nonlinear in X but mixing no context, parameter-matched to one inner
attention). Every Nexus row is the paper's form (gate "none", inner modules random). Equal tokens:
every row trains the same steps on the same batches (same seed, same data order). Reported: parameter
counts, training FLOPs (torch's FlopCounterMode on one training step x steps), per-task accuracy
(acc_norm for the HellaSwag format, as Pythia reports it), means over seeds with standard errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import scratch_world as world_mod
from .common import (
    ExperimentOutput,
    environment,
    limit_threads,
    markdown_table,
    mean_std,
    pyplot,
    write_outputs,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "scratch"
# row -> NexusConfig settings (None: the baseline); all in the paper's form (gate none, inner random)
ROWS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "Nexus-Q": {"order": 2, "projections": "q", "inner": "separate"},
    "Nexus-QK": {"order": 2, "projections": "qk", "inner": "separate"},
    "Nexus-QKV": {"order": 2, "projections": "qkv", "inner": "separate"},
    "Nexus-QK-shared": {"order": 2, "projections": "qk", "inner": "shared"},
    "Nexus-QK-shared order 3": {"order": 3, "projections": "qk", "inner": "shared"},
    "MLP-QK (control)": {"order": 2, "projections": "qk", "inner": "mlp"},
}
# what Pythia reports per task (lm-eval's metric); acc for the others
METRIC = {"world_hellaswag": "acc_norm"}
# The tiny GPT-NeoX: Pythia's layout (rotary_pct 0.25, parallel residual, biases, untied head).
MODEL = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
)
# The Pythia recipe's optimiser and schedule (recipes/Pythia-70M/pretrain/config_baseline.yaml),
# the sizes scaled to a CPU; tests/experiments/test_scratch.py checks these keys against the recipe.
RECIPE: dict[str, Any] = {
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1.0e-8,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "packing": True,
    "packing_strategy": "wrapped",
    "dataset_text_field": "text",
    "dtype": "float32",
    "bf16": False,
    "fp16": False,
    "report_to": "none",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    max_steps: int = 200
    batch_size: int = 16
    max_length: int = 128  # tokens per packed row: 2,048 tokens a step
    warmup_ratio: float = 0.01  # Pythia's 1% warm-up
    seeds: int = 3
    eval_limit: int | None = None  # rows per task (None: all)
    rows: tuple[str, ...] = tuple(ROWS)
    tasks: tuple[str, ...] = world_mod.TASKS
    eval_batch: int = 64


QUICK = Settings(
    max_steps=3,
    batch_size=4,
    max_length=64,
    seeds=1,
    eval_limit=8,
    rows=("baseline", "Nexus-QK"),
    tasks=("world_arc_easy", "world_arc_challenge"),
)


# ------------------------------------------------------------------------------------------ setup
def prepare(work: Path) -> dict[str, Path]:
    """The corpus (one paragraph per line), the tokenizer + config folder `init` reads, the tasks."""
    from ..demo.tokenizer import train_tokenizer

    world = world_mod.build_world()
    paragraphs = world_mod.corpus(world)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(paragraphs) + "\n")
    tasks = world_mod.write_tasks(world, work / "tasks")
    task_texts = [json.dumps(r) for rows in world_mod.task_rows(world).values() for r in rows]
    tokenizer = train_tokenizer([*paragraphs, *task_texts], vocab_size=768)
    base = work / "base"
    tokenizer.save_pretrained(base)
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(
        **MODEL,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(base)
    return {"corpus": corpus, "base": base, "tasks": tasks["world_arc_easy"].parent}


def initialise(row: str, seed: int, paths: dict[str, Path], work: Path) -> tuple[Path, dict[str, Any]]:
    """`init` for the row: its model folder (the baseline, or the Nexus model) and init's record."""
    from ..initialization import BASELINE, NEXUS, init_from_config
    from ..modeling import NexusConfig

    block = ROWS[row] or ROWS["Nexus-QK"]  # the baseline of any init with this seed is the same model
    out = work / "init" / f"{_slug(row)}-s{seed}"
    result = init_from_config(paths["base"], out, NexusConfig(**block, gate="none"), seed=seed)
    return out / (BASELINE if ROWS[row] is None else NEXUS), result.record


def pretrain(model: Path, seed: int, paths: dict[str, Path], out: Path, settings: Settings) -> dict[str, Any]:
    """The `train` command's Python API on the corpus, the Pythia recipe scaled down."""
    from ..train import run_training

    recipe = {
        **RECIPE,
        "model_name_or_path": str(model),
        "dataset_name": str(paths["corpus"]),
        "output_dir": str(out),
        "use_cpu": True,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "warmup_steps": max(1, round(settings.warmup_ratio * settings.max_steps)),
        "logging_steps": max(1, settings.max_steps // 20),
        "seed": seed,
        "data_seed": 0,  # one data order for every row and seed: equal tokens, same batches
    }
    if "nexus" in json.loads((model / "config.json").read_text()):
        recipe["nexus"] = {"inner_lr_multiplier": 1.0}  # from scratch: one learning rate for all
    start = time.process_time()
    result = run_training(recipe)
    return {
        "train_cpu_seconds": round(time.process_time() - start, 1),
        "losses": result.losses,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "path": str(result.output_dir),
    }


def training_flops(model_path: Path, settings: Settings) -> int:
    """FLOPs of one training step (forward + backward, batch x max_length tokens) x max_steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config._attn_implementation = "eager"  # matmuls the counter sees (sdpa counts the same)
    ids = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.max_length))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return int(counter.get_total_flops()) * settings.max_steps


def zero_shot(model_path: Path, task_manager: Any, settings: Settings) -> dict[str, dict[str, float]]:
    """lm-eval's scores of the model on the tasks (its HF backend, its multiple-choice scoring):
    {task: {acc, acc_stderr, acc_norm, acc_norm_stderr}}."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_path), "dtype": "float32", "backend": "causal"},
        tasks=list(settings.tasks),
        task_manager=task_manager,
        batch_size=settings.eval_batch,
        device="cpu",
        limit=settings.eval_limit,
        log_samples=False,
    )
    return {
        task: {
            metric: float(values[f"{metric},none"])
            for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
        }
        for task, values in out["results"].items()
    }


def task_manager(tasks_dir: Path) -> Any:
    """lm-eval's TaskManager over the world's task YAMLs only (indexing its own ~10k tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _slug(row: str) -> str:
    return row.lower().replace(" ", "-").replace("(", "").replace(")", "")


# -------------------------------------------------------------------------------------------- run
def run(
    output_dir: Path,
    quick: bool = False,
    seeds: int | None = None,
    threads: int = 1,
    settings: Settings | None = None,
    work_dir: Path | None = None,
) -> ExperimentOutput:
    import importlib.util
    import tempfile

    if importlib.util.find_spec("lm_eval") is None:  # before any work: the scoring is lm-eval's
        raise ModuleNotFoundError(
            "experiment scratch scores through lm-evaluation-harness, which is not installed: "
            "pip install 'nexus-retrofit[zero-shot]' (or lm-eval)"
        )
    settings = settings or (QUICK if quick else Settings())
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    limit_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="nexus-scratch-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        paths = prepare(work)
        results: dict[str, Any] = {
            "experiment": NAME,
            "quick": quick,
            "settings": dataclasses.asdict(settings),
            "model": MODEL,
            "recipe": RECIPE,
            "rows": {row: ROWS[row] for row in settings.rows},
            "tasks": {
                t: {"needs": 1 if t in world_mod.ONE_FACT else 2, "chance": world_mod.chance(t)}
                for t in settings.tasks
            },
            "task_rows": {  # what lm-eval scores: the held-out rows (write_tasks)
                t: sum(r["held_out"] for r in v)
                for t, v in world_mod.task_rows(world_mod.build_world()).items()
            },
            "runs": {},
        }
        tasks = task_manager(paths["tasks"])
        for row in settings.rows:
            runs = []
            for seed in range(settings.seeds):
                model, record = initialise(row, seed, paths, work)
                trained = pretrain(model, seed, paths, work / "runs" / f"{_slug(row)}-s{seed}", settings)
                scores = zero_shot(Path(trained.pop("path")), tasks, settings)
                part = "baseline" if ROWS[row] is None else "nexus"
                runs.append(
                    {"seed": seed, "parameters": record[part]["parameters"], **trained, "scores": scores}
                )
            flops = training_flops(model, settings)
            results["runs"][row] = {"training_flops": flops, "seeds": runs}
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["environment"] = environment()
    return write_outputs(NAME, Path(output_dir), results, render_markdown(results), render_plot(results))


# ----------------------------------------------------------------------------------------- report
def _score(run: dict[str, Any], task: str) -> float:
    return run["scores"][task][METRIC.get(task, "acc")]


def _mean_se(values: list[float], scale: float = 100.0) -> tuple[float, float]:
    mean, std = mean_std([v * scale for v in values])
    return mean, (std / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    return _format(_mean_se(values, scale), digits)


def _format(mean_se: tuple[float, float], digits: int = 1) -> str:
    mean, se = mean_se
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def summary(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row: {task / "one-fact" / "two-fact" / "avg": (mean %, standard error over seeds)}}."""
    tasks = list(results["tasks"])
    out = {}
    for row, data in results["runs"].items():
        runs = data["seeds"]
        cells = {t: _mean_se([_score(r, t) for r in runs]) for t in tasks}
        groups = {
            "one-fact": [t for t in tasks if results["tasks"][t]["needs"] == 1],
            "two-fact": [t for t in tasks if results["tasks"][t]["needs"] == 2],
            "avg": tasks,
        }
        for name, members in groups.items():
            if members:
                cells[name] = _mean_se([sum(_score(r, t) for t in members) / len(members) for r in runs])
        out[row] = cells
    return out


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    tasks = list(results["tasks"])
    tokens = s["max_steps"] * s["batch_size"] * s["max_length"]
    seeds = len(next(iter(results["runs"].values()))["seeds"])
    lines = [
        f"# Experiment `scratch`{' (quick)' if results['quick'] else ''}: Tables 1-2 in miniature\n",
        f"Tiny GPT-NeoX models ({results['model']['num_hidden_layers']} layers, hidden "
        f"{results['model']['hidden_size']}, {results['model']['num_attention_heads']} heads, rotary_pct "
        f"{results['model']['rotary_pct']}) initialised by `init` and pretrained from scratch by `train` "
        f"(the Pythia recipe's optimiser, lr {results['recipe']['learning_rate']}, cosine to 10%) for "
        f"{s['max_steps']} steps of {s['batch_size']} x {s['max_length']} tokens ({tokens:,} tokens, the "
        f"same batches for every row) on the made-up world's corpus; scored zero-shot by lm-evaluation-"
        f"harness on its six tasks (rows per task: "
        + ", ".join(f"{t} {results['task_rows'][t]}" for t in tasks)
        + f"{'; at most ' + str(s['eval_limit']) + ' in this run' if s['eval_limit'] else ''}). "
        f"Accuracy in %, mean ± standard error over {seeds} seed(s) (acc_norm for the HellaSwag format). "
        "Chance: 25% (50% for the PIQA format). One-fact tasks ask what the corpus states; two-fact tasks "
        "need two stated facts composed, which the corpus never states.\n",
    ]
    table = summary(results)
    headers = [
        "row",
        "params",
        "train FLOPs",
        *[t.removeprefix("world_") for t in tasks],
        "one-fact",
        "two-fact",
        "avg",
    ]
    rows = []
    for row, data in results["runs"].items():
        cells = table[row]
        runs = data["seeds"]
        rows.append(
            [row, f"{runs[0]['parameters']:,}", f"{data['training_flops']:.2e}"]
            + [_cell([_score(r, t) for r in runs]) for t in tasks]
            + [_format(cells[g]) if g in cells else "-" for g in ("one-fact", "two-fact", "avg")]
        )
    lines.append(markdown_table(headers, rows))
    losses = [
        [row, _cell([r["final_loss"] for r in data["seeds"]], 1.0, 3)]
        for row, data in results["runs"].items()
    ]
    lines.append("Final training loss (last logged step, mean ± SE):\n")
    lines.append(markdown_table(["row", "loss"], losses))
    lines.append(f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU in this process.\n")
    return "\n".join(lines)


def render_plot(results: dict[str, Any]) -> Figure:
    plt = pyplot()
    table = summary(results)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4))
    for row, data in results["runs"].items():
        losses = data["seeds"][0]["losses"]
        ax_loss.plot([st for st, _ in losses], [v for _, v in losses], label=row)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Pretraining loss (seed 0)")
    ax_loss.legend(fontsize=7)
    names = list(results["runs"])
    groups = [g for g in ("one-fact", "two-fact") if all(g in table[n] for n in names)]
    width = 0.8 / max(1, len(groups))
    for i, group in enumerate(groups):
        xs = [x + (i - (len(groups) - 1) / 2) * width for x in range(len(names))]
        means = [table[n][group][0] for n in names]
        errors = [0 if math.isnan(table[n][group][1]) else table[n][group][1] for n in names]
        ax_acc.bar(xs, means, width, yerr=errors, capsize=3, label=f"{group} tasks")
    ax_acc.axhline(25, linestyle=":", color="grey", linewidth=1)
    ax_acc.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_acc.set(
        ylabel="zero-shot accuracy (%)",
        title="Zero-shot accuracy, mean ± SE over seeds (dotted: 4-way chance)",
    )
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig
