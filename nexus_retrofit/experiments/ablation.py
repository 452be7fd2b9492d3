"""Experiment `ablation`: the paper's Table 2 in miniature, on the embedded tiny Qwen2.

Table 2 ablates which projections are refined (Q, QK, QKV), shared vs separate inner weights,
and the order. Here every row starts from the same pretrained tiny model
(nexus_retrofit/assets/tiny-qwen2), is converted with `nexus_retrofit.convert` (gate zero: every
Nexus row starts with exactly the base model's logits, inner init random) and gets the same SFT
budget: the demo's two-step SFT rows in the same order, same steps, batch, learning rate schedule
and seed. Rows: baseline (no conversion), Nexus-Q, -QK, -QKV (separate, order 2), -QK-shared,
-QK-self, and -QK order 3. Scored on held-out problems: greedy exact-match accuracy on single- and
two-step problems, and the loss on the held-out solutions (assistant tokens).

The SFT is a plain torch loop with the demo recipe's settings (AdamW, cosine with 5% warmup,
completion-only loss, grad clip 1.0), not TRL: through `SFTTrainer` one step cost ~3x the bare
forward/backward on this 2-core machine, and seven rows must fit the CPU budget. The `demo`
command covers the TRL path. The new parameters (inner modules and zero-initialised gates) train at
`inner_lr_multiplier` x the base learning rate (`nexus-retrofit train`'s `nexus.inner_lr_multiplier`):
at lr 1e-4, Adam moves a zero gate by at most ~1e-4 a step, so with a multiplier of 1 a short run
would barely switch the inner attention on and would measure the zero-gate init, not the
architecture. The multiplier is the same for every Nexus row.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    ExperimentOutput,
    environment,
    limit_threads,
    markdown_table,
    pyplot,
    set_seed,
    write_outputs,
)

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "ablation"

# row -> nexus settings (None: the baseline, plain SFT of the base model)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "Nexus-Q": {"order": 2, "projections": "q", "inner": "separate"},
    "Nexus-QK": {"order": 2, "projections": "qk", "inner": "separate"},
    "Nexus-QKV": {"order": 2, "projections": "qkv", "inner": "separate"},
    "Nexus-QK-shared": {"order": 2, "projections": "qk", "inner": "shared"},
    "Nexus-QK-self": {"order": 2, "projections": "qk", "inner": "self"},
    "Nexus-QK order 3": {"order": 3, "projections": "qk", "inner": "separate"},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The SFT budget (the demo's recipe, docs/DESIGN.md §9, fewer steps) and the evaluation size."""

    max_steps: int = 100
    learning_rate: float = 1e-4
    warmup: float = 0.05
    batch_size: int = 16
    max_grad_norm: float = 1.0
    inner_lr_multiplier: float = 10.0
    eval_per_level: int = 250  # held-out problems per level (binomial SE <= 3.2 points)
    eval_batch: int = 250
    seeds: int = 1
    log_every: int = 10
    configs: tuple[str, ...] = tuple(CONFIGS)


QUICK = Settings(max_steps=2, eval_per_level=6, log_every=1, configs=("baseline", "Nexus-QK"))


# ------------------------------------------------------------------------------------------ data
def _eval_rows(settings: Settings) -> dict[int, list[dict]]:
    from ..demo.arithmetic import read_jsonl
    from ..demo.assets import eval_data_path

    rows = read_jsonl(eval_data_path())
    return {
        level: [r for r in rows if int(r["level"]) == level][: settings.eval_per_level] for level in (1, 2)
    }


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Chat-templated ids of (user prompt, assistant completion) and labels (-100 on the prompt)."""
    user = [{"role": "user", "content": prompt}]
    p = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": completion}], tokenize=False
    )
    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if f_ids[: len(p_ids)] != p_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return f_ids, [-100] * len(p_ids) + f_ids[len(p_ids) :]


def collate(
    examples: list[tuple[list[int], list[int]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (B, T)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def completion_loss(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the next token on the labelled (assistant) positions."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


# ------------------------------------------------------------------------------------ measuring
def heldout_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], batch_size: int = 100
) -> float:
    """Mean cross-entropy per assistant token (solution + end of turn) of the held-out rows."""
    import torch

    from ..demo.arithmetic import MATH_PROMPT

    examples = [encode(tokenizer, MATH_PROMPT + r["problem"], r["solution"]) for r in rows]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            total += float(completion_loss(model, ids, mask, labels, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: dict[int, list[dict]],
    settings: Settings,
) -> dict[str, float]:
    """Greedy accuracy per level and held-out loss, in float32."""
    from ..demo.scoring import greedy_accuracy

    model.eval()
    out = {
        f"acc_level{level}": greedy_accuracy(model, tokenizer, r, settings.eval_batch)
        for level, r in rows.items()
    }
    out["heldout_loss"] = heldout_loss(model, tokenizer, rows[1] + rows[2])
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def load_row(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny base model, converted for `name` (new parameters drawn from `seed`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..converter import convert
    from ..demo.assets import tiny_model_path
    from ..modeling import NexusConfig

    path = tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    block = CONFIGS[name]
    if block is not None:
        set_seed(seed)
        model = convert(model, NexusConfig(**block, gate="zero", inner_init="random"))
    return model, tokenizer


def sft(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, seed: int
) -> dict[str, Any]:
    """The same SFT for every row: the demo's two-step rows in a seeded order, AdamW, cosine schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from ..demo.arithmetic import read_jsonl
    from ..demo.assets import sft_data_path
    from ..modeling.names import is_nexus_parameter

    rows = read_jsonl(sft_data_path())
    examples = [encode(tokenizer, r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    named = list(model.named_parameters())
    base = [p for n, p in named if not is_nexus_parameter(n)]
    new = [p for n, p in named if is_nexus_parameter(n)]
    groups = [{"params": base, "lr": settings.learning_rate}]
    if new:
        groups.append({"params": new, "lr": settings.learning_rate * settings.inner_lr_multiplier})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(
        opt, math.ceil(settings.warmup * settings.max_steps), settings.max_steps
    )
    model.train()
    losses: list[tuple[int, float]] = []
    start, cpu = time.time(), time.process_time()
    for step in range(1, settings.max_steps + 1):
        lo = ((step - 1) * settings.batch_size) % len(order)
        batch = [examples[order[(lo + i) % len(order)]] for i in range(settings.batch_size)]
        loss = completion_loss(model, *collate(batch, tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        sched.step()
        if step % settings.log_every == 0 or step == settings.max_steps:
            losses.append((step, float(loss.detach())))
    gates = [p.detach().abs() for n, p in named if ".gates." in n]
    return {
        "train_seconds": round(time.time() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),
        "final_train_loss": sum(v for _, v in losses[-3:]) / len(losses[-3:]),
        "gate_abs_mean": float(sum(g.sum() for g in gates) / sum(g.numel() for g in gates))
        if gates
        else None,
        "losses": losses,
    }


# ------------------------------------------------------------------------------------------- run
def run(
    output_dir: Path,
    quick: bool = False,
    seeds: int | None = None,
    threads: int = 1,
    settings: Settings | None = None,
) -> ExperimentOutput:
    """Baseline and every Nexus row with the same SFT budget; held-out accuracy and loss.

    `settings` replaces the full/quick defaults (e.g. another inner_lr_multiplier or a subset of rows).
    """
    from ..demo.assets import tiny_model_path

    settings = settings or (QUICK if quick else Settings())
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    limit_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    rows = _eval_rows(settings)
    model, tokenizer = load_row("baseline", 0)
    results: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "seeds": list(range(settings.seeds)),
        "configs": {k: CONFIGS[k] for k in settings.configs},
        "base_model": str(tiny_model_path()),
        "pretrained": score(model, tokenizer, rows, settings),
        "runs": {},
    }
    for name in settings.configs:
        per_seed = []
        for seed in range(settings.seeds):
            model, tokenizer = load_row(name, seed)
            trained = sft(model, tokenizer, settings, seed)
            eval_start = time.time()
            scores = score(model, tokenizer, rows, settings)
            per_seed.append(
                {"seed": seed, **trained, **scores, "eval_seconds": round(time.time() - eval_start, 1)}
            )
        results["runs"][name] = per_seed
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["environment"] = environment()
    return write_outputs(NAME, Path(output_dir), results, render_markdown(results), render_plot(results))


# ---------------------------------------------------------------------------------------- report
def _stat(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    from .common import mean_std

    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    n = s["eval_per_level"]
    se2 = 100 * math.sqrt(0.25 / n)  # the largest binomial standard error of one accuracy
    pre = results["pretrained"]
    lines = [
        f"# Experiment `ablation`{' (quick)' if results['quick'] else ''}\n",
        f"Table 2 in miniature: the tiny Qwen2 ({pre['parameters']:,} parameters), each row SFT'd for "
        f"{s['max_steps']} steps (batch {s['batch_size']}, AdamW lr {s['learning_rate']}, cosine, fp32; "
        f"Nexus parameters at {s['inner_lr_multiplier']}x lr; gate zero, inner init random) on the demo's "
        f"two-step SFT set; seeds {results['seeds']}. Held-out: {n} single-step and {n} two-step problems, "
        "greedy exact match; loss = mean cross-entropy per assistant token of the held-out solutions. One "
        f"accuracy on {n} problems has a binomial standard error of up to {se2:.1f} points.\n",
    ]
    rows = [["pretrained (no SFT)", f"{pre['parameters']:,}", f"{100 * pre['acc_level1']:.1f}"]]
    rows[0] += [f"{100 * pre['acc_level2']:.1f}", f"{pre['heldout_loss']:.5f}", "-", "-", "-", "-"]
    for name, runs in results["runs"].items():
        gates = [r["gate_abs_mean"] for r in runs if r.get("gate_abs_mean") is not None]
        rows.append(
            [
                name,
                f"{runs[0]['parameters']:,}",
                _stat([r["acc_level1"] for r in runs], 100),
                _stat([r["acc_level2"] for r in runs], 100),
                _stat([r["heldout_loss"] for r in runs], 1, 5),
                _stat([r["final_train_loss"] for r in runs], 1, 4),
                _stat(gates, 1, 4) if gates else "-",
                _stat([r["train_cpu_seconds"] for r in runs], 1, 0),
                _stat([r["eval_seconds"] for r in runs], 1, 0),
            ]
        )
    headers = [
        "row",
        "params",
        "1-step acc (%)",
        "2-step acc (%)",
        "held-out loss",
        "train loss (last 3 logs)",
    ]
    headers += ["mean abs gate after SFT", "SFT CPU s", "eval s"]
    lines.append(markdown_table(headers, rows))
    lines.append(f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU in this process.\n")
    return "\n".join(lines)


def render_plot(results: dict[str, Any]) -> Figure:
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(results["runs"])
    for name in names:
        losses = results["runs"][name][0]["losses"]
        ax_loss.plot([st for st, _ in losses], [v for _, v in losses], label=name)
    ax_loss.set(
        xlabel="SFT step",
        ylabel="training loss (completion tokens)",
        title="SFT loss of the logged step's batch (seed 0)",
    )
    ax_loss.legend(fontsize=7)
    width = 0.38
    xs = range(len(names))
    for offset, level in ((-width / 2, 1), (width / 2, 2)):
        vals = [
            100 * sum(r[f"acc_level{level}"] for r in results["runs"][n]) / len(results["runs"][n])
            for n in names
        ]
        ax_acc.bar([x + offset for x in xs], vals, width, label=f"{level}-step")
        ax_acc.axhline(
            100 * results["pretrained"][f"acc_level{level}"],
            linestyle=":",
            linewidth=1,
            color="C0" if level == 1 else "C1",
        )
    ax_acc.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax_acc.set(ylabel="held-out accuracy (%)", title="Held-out accuracy (dotted: before SFT)")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig
