"""Experiment `multihop`: can one attention layer compose two lookups? (the paper's reasoning claim)

Task (pointer chasing). A random permutation f of K symbols that is one K-cycle (so s, f(s) and
f(f(s)) are distinct) is listed as K "edge" tokens (src, f(src)) in random order; a final query
token names a symbol s; the model must output f(f(s)) from the query position. Causal mask, no
positional encoding (the edges are a set).

Why it separates the variants: one standard attention layer scores each edge against a query built
from the query token alone: it can fetch f(s), but no query selects the second edge, which needs
f(s) itself (only soft, partial strategies remain, e.g. excluding s and f(s), or pairing
information carried by the softmax weights). A second layer gives it that query. Nexus-Q's inner attention can
fetch f(s) *before* the outer query is formed (Eq. 10-11), so the outer attention can look up the
edge leaving f(s); the K-side inner attention can likewise write into an edge's key the symbol
pointing to it. The token-wise `mlp` control is nonlinear in the same place but sees one token,
so it cannot. Every model has (within 1%) the parameter count of the Nexus-QK `separate` model of
the same depth: the other variants get a wider block MLP.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    ExperimentOutput,
    environment,
    fmt_mean_std,
    limit_threads,
    markdown_table,
    mean_std,
    pyplot,
    set_seed,
    write_outputs,
)
from .layers import QK_VARIANTS, MixerSpec, NexusMixer, count_parameters

NAME = "multihop"

VARIANTS: dict[str, MixerSpec] = QK_VARIANTS


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and budget. Full run: these defaults; `--quick`: QUICK."""

    symbols: int = 8  # K: edges per sequence and output classes
    dim: int = 32
    heads: int = 2
    depths: tuple[int, ...] = (1, 2)
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    eval_every: int = 100
    eval_size: int = 512
    seeds: int = 3
    variants: tuple[str, ...] = tuple(VARIANTS)


QUICK = Settings(steps=40, seeds=1, eval_every=20, eval_size=128)


# ---------------------------------------------------------------------------------------- data
def make_batch(
    symbols: int, batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges (B, K, 2) as (src, dst) in random order, queries (B,) and answers f(f(query)) (B,)."""
    order = torch.rand(batch, symbols, generator=gen).argsort(-1)  # a random cyclic order of the symbols
    f = torch.empty_like(order)
    f.scatter_(1, order, order.roll(-1, dims=1))  # f(order[i]) = order[i+1]: one K-cycle
    src = torch.rand(batch, symbols, generator=gen).argsort(-1)  # edges listed in random order
    edges = torch.stack([src, f.gather(1, src)], dim=-1)  # (B, K, 2)
    query = torch.randint(0, symbols, (batch,), generator=gen)
    answer = f.gather(1, f.gather(1, query[:, None]))[:, 0]
    return edges, query, answer


# --------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm block: x + Mixer(LN(x)), then x + MLP(LN(x)). The mixer's inner attentions read LN(x)."""

    def __init__(self, dim: int, heads: int, spec: MixerSpec, mlp_hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = NexusMixer(dim, heads, dim // heads, spec, causal=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PointerModel(nn.Module):
    """Edge token = E_src[src] + E_dst[dst]; query token = E_query[s]; logits over K at the query."""

    def __init__(self, settings: Settings, depth: int, spec: MixerSpec, mlp_hidden: int):
        super().__init__()
        k, d = settings.symbols, settings.dim
        self.src, self.dst, self.query = nn.Embedding(k, d), nn.Embedding(k, d), nn.Embedding(k, d)
        self.blocks = nn.ModuleList(Block(d, settings.heads, spec, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, edges: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = self.src(edges[..., 0]) + self.dst(edges[..., 1])  # (B, K, d)
        x = torch.cat([x, self.query(query)[:, None]], dim=1)  # (B, K+1, d): the query comes last
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -1]))  # (B, K)


def build(settings: Settings, depth: int, variant: str, target_params: int | None = None) -> PointerModel:
    """The model of `variant`, its block-MLP width chosen so the total is closest to target_params."""
    spec, d = VARIANTS[variant], settings.dim
    if target_params is None:
        return PointerModel(settings, depth, spec, 4 * d)
    per_unit = depth * (2 * d + 1)  # one more hidden unit in every block MLP
    base = count_parameters(PointerModel(settings, depth, spec, 1)) - per_unit  # without MLP hidden units
    hidden = max(1, round((target_params - base) / per_unit))
    return PointerModel(settings, depth, spec, hidden)


def target_parameters(settings: Settings, depth: int) -> int:
    """The reference size: Nexus-QK `separate` with the standard block MLP (hidden 4d)."""
    return count_parameters(build(settings, depth, "separate"))


# ------------------------------------------------------------------------------------ training
@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    edges, query, answer = data
    model.eval()
    logits = model(edges, query)
    model.train()
    loss = nn.functional.cross_entropy(logits, answer)
    return float((logits.argmax(-1) == answer).float().mean()), float(loss)


def train_one(settings: Settings, depth: int, variant: str, seed: int, eval_data) -> dict[str, Any]:
    """Adam on fresh batches (no data reuse); held-out accuracy every eval_every steps."""
    set_seed(seed)
    model = build(settings, depth, variant, target_parameters(settings, depth))
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(1_000 + seed)
    curve: list[tuple[int, float, float]] = []
    start = time.time()
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            curve.append((step, *accuracy(model, eval_data)))
        if step == settings.steps:
            break
        edges, query, answer = make_batch(settings.symbols, settings.batch, gen)
        loss = nn.functional.cross_entropy(model(edges, query), answer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {
        "parameters": count_parameters(model),
        "mlp_hidden": model.blocks[0].mlp[0].out_features,
        "final_accuracy": curve[-1][1],
        "final_loss": curve[-1][2],
        "best_accuracy": max(a for _, a, _ in curve),
        "curve": curve,
        "seconds": round(time.time() - start, 1),
    }


def run(
    output_dir: Path, quick: bool = False, seeds: int | None = None, threads: int = 1
) -> ExperimentOutput:
    """Train every (depth, variant) for `seeds` seeds; write JSON, markdown and PNG."""
    settings = QUICK if quick else Settings()
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    limit_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    eval_data = make_batch(settings.symbols, settings.eval_size, torch.Generator().manual_seed(99_999))
    results: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "seeds": list(range(settings.seeds)),
        "variants": {k: VARIANTS[k].label for k in settings.variants},
        "chance_accuracy": 1 / settings.symbols,
        "runs": {},
    }
    for depth in settings.depths:
        results["runs"][f"{depth}-layer"] = {
            v: [train_one(settings, depth, v, seed, eval_data) for seed in range(settings.seeds)]
            for v in settings.variants
        }
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["environment"] = environment()
    return write_outputs(NAME, Path(output_dir), results, render_markdown(results), render_plot(results))


# -------------------------------------------------------------------------------------- report
def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"# Experiment `multihop`{' (quick)' if results['quick'] else ''}\n",
        f"Two-hop pointer chasing over K = {s['symbols']} symbols (answer f(f(s)); chance "
        f"{results['chance_accuracy']:.3f}). Width {s['dim']}, {s['heads']} heads, Adam lr {s['lr']}, batch "
        f"{s['batch']} fresh sequences per step, {s['steps']} steps, accuracy on {s['eval_size']} held-out "
        f"sequences; mean ± std over seeds {results['seeds']}. Parameter counts matched within each depth.\n",
    ]
    depths = list(results["runs"])
    rows = []
    for v, label in results["variants"].items():
        row = [label]
        for depth in depths:
            runs = results["runs"][depth][v]
            row += [
                runs[0]["parameters"],
                fmt_mean_std([r["final_accuracy"] for r in runs], 3),
                fmt_mean_std([r["best_accuracy"] for r in runs], 3),
            ]
        rows.append(row)
    headers = ["variant"]
    for depth in depths:
        headers += [f"{depth} params", f"{depth} final acc", f"{depth} best acc"]
    lines.append(markdown_table(headers, rows))
    lines.append("\nFirst evaluation step at which held-out accuracy ≥ 0.9 (per seed; '-' = never):\n")
    rows = []
    for v, label in results["variants"].items():
        row = [label]
        for depth in depths:
            hits = []
            for r in results["runs"][depth][v]:
                step = next((st for st, a, _ in r["curve"] if a >= 0.9), None)
                hits.append("-" if step is None else str(step))
            row.append(", ".join(hits))
        rows.append(row)
    lines.append(markdown_table(["variant", *depths], rows))
    secs = {d: sum(r["seconds"] for v in results["runs"][d].values() for r in v) for d in depths}
    lines.append(
        f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU in all ({', '.join(f'{d}: {t:.0f} s' for d, t in secs.items())}; "
        f"{results['environment']['torch_threads']} torch thread(s)).\n"
    )
    return "\n".join(lines)


def render_plot(results: dict[str, Any]):
    plt = pyplot()
    depths = list(results["runs"])
    fig, axes = plt.subplots(1, len(depths), figsize=(5.2 * len(depths), 3.8), squeeze=False, sharey=True)
    for ax, depth in zip(axes[0], depths):
        for v, label in results["variants"].items():
            runs = results["runs"][depth][v]
            acc = torch.tensor([[a for _, a, _ in r["curve"]] for r in runs])  # (S, T)
            steps = [st for st, _, _ in runs[0]["curve"]]
            mean, std = acc.mean(0), (acc.std(0) if acc.shape[0] > 1 else torch.zeros(acc.shape[1]))
            ax.plot(steps, mean.numpy(), label=f"{label} ({runs[0]['parameters']} p)")
            ax.fill_between(steps, (mean - std).numpy(), (mean + std).numpy(), alpha=0.15)
        ax.axhline(results["chance_accuracy"], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(f"{depth} model")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("held-out accuracy, f(f(s))")
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Multihop: two-hop pointer chasing (mean ± std over seeds)")
    fig.tight_layout()
    return fig


__all__ = ["NAME", "QUICK", "Settings", "VARIANTS", "build", "make_batch", "mean_std", "run"]
