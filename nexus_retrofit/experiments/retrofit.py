"""Experiment `retrofit`: does converting a trained standard model to Nexus let it learn what it could not?

Setting: the `multihop` task (two-hop pointer chasing, K = 8) in the format where a 1-layer Nexus
trained from scratch beats a 1-layer standard model (the positive control, measured here first:
`reference` format, the product's Qwen2 + `convert`). Then, per seed:

1. pretrain a 1-layer standard model for `pretrain_steps` (it plateaus well below 1);
2. continue training it for `finetune_steps` (the control: equal steps, no new parameters), and,
   from the same pretrained weights, `convert` it with each retrofit mechanic and fine-tune it for
   the same steps at the same learning rate:
     zero       gate zero, inner random, gates at the base rate (the old default)
     gate-lr    gate zero, inner random, gates at `gate_lr_multiplier` x the base rate
     zero_out   gate open, inner o_proj zero (exactly function-preserving, first-order signal)
     none       the paper's ungated form (X_p = Inner_p(X); not function-preserving)

Reported per arm: held-out accuracy curves, the final path strength ||f(g_p) Inner_p(X)|| / ||X||
(the trainer's probe) and mean |f(g)|, parameters and seconds (the compute: every arm runs the same
number of steps on the same batches; a Nexus step costs more, its seconds say how much).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .common import (
    ExperimentOutput,
    environment,
    fmt_mean_std,
    limit_threads,
    markdown_table,
    pyplot,
    set_seed,
    write_outputs,
)
from .multihop import FORMATS, accuracy, build, count_parameters, make_batch, train_one
from .multihop import Settings as TaskSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "retrofit"

# mechanic -> (NexusConfig settings, gate learning-rate multiplier)
MECHANICS: dict[str, tuple[dict[str, Any], float]] = {
    "zero": ({"gate": "zero", "inner_init": "random"}, 1.0),
    "gate-lr": ({"gate": "zero", "inner_init": "random"}, 100.0),
    "zero_out": ({"gate": "open", "inner_init": "zero_out"}, 1.0),
    "none": ({"gate": "none", "inner_init": "random"}, 1.0),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and budget. Full run: these defaults; `--quick`: QUICK."""

    task: TaskSettings = TaskSettings()
    format: str = "reference"
    scratch_steps: int = 1500  # positive control: standard vs Nexus `separate` from scratch
    pretrain_steps: int = 1000
    finetune_steps: int = 1500
    finetune_lr: float = 1e-3
    eval_every: int = 100
    seeds: int = 5
    mechanics: tuple[str, ...] = tuple(MECHANICS)


QUICK = Settings(
    task=TaskSettings(eval_size=128),
    scratch_steps=20,
    pretrain_steps=20,
    finetune_steps=20,
    eval_every=10,
    seeds=1,
    mechanics=("zero_out", "gate-lr"),
)


# ------------------------------------------------------------------------------------ training
def _optimizer(model: nn.Module, lr: float, gate_multiplier: float) -> torch.optim.Optimizer:
    """Adam; the Nexus gates in their own group at lr x gate_multiplier (as the trainer does)."""
    from ..modeling.names import is_gate

    named = list(model.named_parameters())
    gates = [p for n, p in named if is_gate(n)]
    rest = [p for n, p in named if not is_gate(n)]
    groups = [{"params": rest, "lr": lr}] + ([{"params": gates, "lr": lr * gate_multiplier}] if gates else [])
    return torch.optim.Adam(groups, lr=lr)


def _probe(model: nn.Module, eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Path strength per projection (mean over layers) and |f(g)| on the held-out batch (Nexus only)."""
    from ..train.trainer import gate_statistics, path_strength, set_path_probes

    set_path_probes(model, True)
    accuracy(model, eval_data)
    strength = path_strength(model)
    set_path_probes(model, False)
    return {"path": strength, **gate_statistics(model)}


def train(
    model: nn.Module,
    steps: int,
    lr: float,
    gen: torch.Generator,
    eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    every: int,
    gate_multiplier: float = 1.0,
) -> list[tuple[int, float, float]]:
    """Adam on fresh batches; (step, accuracy, loss) on the held-out batch every `every` steps."""
    opt = _optimizer(model, lr, gate_multiplier)
    symbols = model.query.num_embeddings
    curve: list[tuple[int, float, float]] = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve.append((step, *accuracy(model, eval_data)))
        if step == steps:
            break
        edges, query, answer = make_batch(symbols, 64, gen)
        loss = nn.functional.cross_entropy(model(edges, query), answer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


def _summary(model: nn.Module, curve: list[tuple[int, float, float]], started: float) -> dict[str, Any]:
    return {
        "parameters": count_parameters(model),
        "final_accuracy": curve[-1][1],
        "final_loss": curve[-1][2],
        "curve": curve,
        "seconds": round(time.time() - started, 1),
    }


def scratch(
    settings: Settings, variant: str, seed: int, eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Positive control: `multihop`'s 1-layer run of `variant` in this format (same init and batches)."""
    task = dataclasses.replace(settings.task, steps=settings.scratch_steps, eval_every=settings.eval_every)
    return train_one(task, 1, variant, seed, eval_data, FORMATS[settings.format])


def retrofit_seed(
    settings: Settings, seed: int, eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Pretrain a standard model; continue it, and convert + fine-tune it per mechanic."""
    from ..converter import convert
    from ..modeling import NexusConfig

    fmt, task = FORMATS[settings.format], settings.task
    set_seed(seed)
    pretrained = build(task, 1, "standard", fmt=fmt)
    started = time.time()
    gen = torch.Generator().manual_seed(2_000 + seed)
    pre_curve = train(pretrained, settings.pretrain_steps, task.lr, gen, eval_data, settings.eval_every)
    out: dict[str, Any] = {"pretrain": _summary(pretrained, pre_curve, started), "arms": {}}
    state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    arms = {"standard (continued)": None, **{m: MECHANICS[m] for m in settings.mechanics}}
    for name, mechanic in arms.items():
        model = build(task, 1, "standard", fmt=fmt)
        model.load_state_dict(state)
        gate_multiplier = 1.0
        if mechanic is not None:
            torch.manual_seed(10_000 + seed)  # the new parameters: same draw for every mechanic
            model.lm = convert(
                model.lm, NexusConfig(order=2, projections="qk", inner="separate", **mechanic[0])
            )
            gate_multiplier = mechanic[1]
        started = time.time()
        gen = torch.Generator().manual_seed(3_000 + seed)  # same batches for every arm
        start_acc = accuracy(model, eval_data)[0]
        curve = train(
            model,
            settings.finetune_steps,
            settings.finetune_lr,
            gen,
            eval_data,
            settings.eval_every,
            gate_multiplier,
        )
        out["arms"][name] = {
            **_summary(model, curve, started),
            "accuracy_at_conversion": start_acc,
            **(_probe(model, eval_data) if mechanic is not None else {}),
        }
    return out


def run(
    output_dir: Path,
    quick: bool = False,
    seeds: int | None = None,
    threads: int = 1,
    settings: Settings | None = None,
) -> ExperimentOutput:
    """Positive control, then the retrofit per mechanic, for `seeds` seeds; write JSON, markdown, PNG.

    `settings` replaces the full run's (e.g. another task format); `quick` is ignored then.
    """
    settings = settings or (QUICK if quick else Settings())
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    limit_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    task = settings.task
    eval_data = make_batch(task.symbols, task.eval_size, torch.Generator().manual_seed(99_999))
    seed_list = list(range(settings.seeds))
    results: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "format": dataclasses.asdict(FORMATS[settings.format]),
        "mechanics": {
            m: {"nexus": MECHANICS[m][0], "gate_lr_multiplier": MECHANICS[m][1]} for m in settings.mechanics
        },
        "seeds": seed_list,
        "chance_accuracy": 1 / task.symbols,
        "scratch": {
            v: [scratch(settings, v, s, eval_data) for s in seed_list] for v in ("standard", "separate")
        },
        "retrofit": [retrofit_seed(settings, s, eval_data) for s in seed_list],
    }
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["environment"] = environment()
    return write_outputs(NAME, Path(output_dir), results, render_markdown(results), render_plot(results))


# -------------------------------------------------------------------------------------- report
def render_markdown(results: dict[str, Any]) -> str:
    s, f = results["settings"], results["format"]
    lines = [
        f"# Experiment `retrofit`{' (quick)' if results['quick'] else ''}\n",
        f"Two-hop pointer chasing, K = {s['task']['symbols']} (chance {results['chance_accuracy']:.3f}), 1 layer, "
        f"width {s['task']['dim']}, format `{s['format']}` (positions {f['positions']}, embedding {f['embedding']}, "
        f"init {f['init']}); the product's Qwen2 + `convert`. Held-out accuracy on {s['task']['eval_size']} "
        f"sequences; mean ± std over seeds {results['seeds']}.\n",
        f"## Positive control: from scratch ({s['scratch_steps']} steps, Adam lr {s['task']['lr']})\n",
    ]
    rows = [
        [
            v,
            runs[0]["parameters"],
            fmt_mean_std([r["final_accuracy"] for r in runs]),
            _per_seed(runs),
            _secs(runs),
        ]
        for v, runs in results["scratch"].items()
    ]
    lines.append(markdown_table(["variant", "params", "final acc", "per seed", "s per run"], rows))
    pre = [r["pretrain"] for r in results["retrofit"]]
    lines.append(
        f"\n## Retrofit: standard pretrained {s['pretrain_steps']} steps (lr {s['task']['lr']}; accuracy "
        f"{fmt_mean_std([p['final_accuracy'] for p in pre])}), then {s['finetune_steps']} more steps at lr "
        f"{s['finetune_lr']} per arm (same batches)\n"
    )
    rows = []
    for arm in results["retrofit"][0]["arms"]:
        runs = [r["arms"][arm] for r in results["retrofit"]]
        path = [r.get("path", {}) for r in runs]
        rows.append(
            [
                arm,
                runs[0]["parameters"],
                fmt_mean_std([r["accuracy_at_conversion"] for r in runs]),
                fmt_mean_std([r["final_accuracy"] for r in runs]),
                _per_seed(runs),
                " / ".join(fmt_mean_std([p.get(k, 0.0) for p in path], 2, True) for k in ("q", "k"))
                if path[0]
                else "-",
                fmt_mean_std([r["nexus_gate_abs_mean"] for r in runs], 3, True)
                if "nexus_gate_abs_mean" in runs[0]
                else "-",
                _secs(runs),
            ]
        )
    headers = [
        "arm",
        "params",
        "acc at start",
        "final acc",
        "per seed",
        "path q / k",
        "mean abs f(g)",
        "s per run",
    ]
    lines.append(markdown_table(headers, rows))
    lines.append(f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU in all.\n")
    return "\n".join(lines)


def _per_seed(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['final_accuracy']:.2f}" for r in runs)


def _secs(runs: list[dict[str, Any]]) -> str:
    return f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"


def render_plot(results: dict[str, Any]) -> Figure:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.8), sharey=True)
    panels = [("from scratch", results["scratch"]), ("after standard pretraining", _arms_by_name(results))]
    for ax, (title, arms) in zip(axes, panels):
        for name, runs in arms.items():
            acc = torch.tensor([[a for _, a, _ in r["curve"]] for r in runs])
            steps = [st for st, _, _ in runs[0]["curve"]]
            mean, std = acc.mean(0), (acc.std(0) if acc.shape[0] > 1 else torch.zeros(acc.shape[1]))
            ax.plot(steps, mean.numpy(), label=name)
            ax.fill_between(steps, (mean - std).numpy(), (mean + std).numpy(), alpha=0.15)
        ax.axhline(results["chance_accuracy"], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set(title=title, xlabel="training step", ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("held-out accuracy, f(f(s))")
    fig.suptitle("Retrofit: two-hop pointer chasing, 1 layer (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def _arms_by_name(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {arm: [r["arms"][arm] for r in results["retrofit"]] for arm in results["retrofit"][0]["arms"]}


__all__ = ["MECHANICS", "NAME", "QUICK", "Settings", "run"]
