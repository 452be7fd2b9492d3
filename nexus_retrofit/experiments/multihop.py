"""Experiment `multihop`: can one attention layer compose two lookups? (the paper's reasoning claim)

Task (pointer chasing). A random permutation f of K symbols that is one K-cycle (so s, f(s) and
f(f(s)) are distinct) is listed as K "edge" tokens (src, f(src)) in random order; a final query
token names a symbol s; the model must output f(f(s)) from the query position. Causal mask.

Why it separates the variants: one standard attention layer scores each edge against a query built
from the query token alone: it can fetch f(s), but no query selects the second edge, which needs
f(s) itself. A second layer gives it that query. Nexus-Q's inner attention can fetch f(s) *before*
the outer query is formed (Eq. 10-11), so the outer attention can look up the edge leaving f(s).

The models are the product's own: a Qwen2ForCausalLM from a Qwen2Config (RMSNorm, SwiGLU MLP, the
real attention class) and, for the Nexus variants, `convert` with a NexusConfig (gate zero, inner
random: every variant starts as exactly its standard model). The sequence goes in as
`inputs_embeds`; the logits over K symbols are the LM head at the query. Within a format and depth
every variant has (within 1%) the parameter count of Nexus-QK `separate`: the others get a wider MLP.

Formats (what the result depends on; each differs from `reference` in one thing, `issue` in all):
  positions  none: position_ids all 0 (RoPE at angle 0: no positional signal, the edges are a set);
             rope: positions 0..K (RoPE, as in any LM)
  embedding  factored: edge token = E_src[src] + E_dst[dst], query = E_query[s];
             edge: one learned embedding per (src, dst) pair (K^2 ids), query = E_query[s]
  init       torch: PyTorch's default init of every Linear/Embedding (uniform, fan-in scaled);
             hf: Qwen2's own init (normal, std 0.02)
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
    mean_std,
    pyplot,
    set_seed,
    write_outputs,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "multihop"

# variant -> label; the Nexus ones are NexusConfig(inner=variant, projections="qk", order=2)
VARIANTS: dict[str, str] = {
    "standard": "standard",
    "separate": "nexus-QK separate",
    "shared": "nexus-QK shared",
    "self": "nexus-QK self",
}


@dataclasses.dataclass(frozen=True)
class Format:
    """How the task is presented to the model: positional encoding, embedding format and init."""

    positions: str = "none"  # none | rope
    embedding: str = "factored"  # factored | edge
    init: str = "torch"  # torch | hf


FORMATS: dict[str, Format] = {
    "reference": Format(),  # the format of the project's earlier standalone-mixer result
    "rope": Format(positions="rope"),
    "edge": Format(embedding="edge"),
    "hf-init": Format(init="hf"),
    "issue": Format("rope", "edge", "hf"),  # the controlled study: single edge tokens, RoPE, HF init
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and budget. Full run: these defaults; `--quick`: QUICK."""

    symbols: int = 8  # K: edges per sequence and output classes
    dim: int = 32
    heads: int = 2
    depths: tuple[int, ...] = (1,)
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    eval_every: int = 100
    eval_size: int = 512
    seeds: int = 3
    variants: tuple[str, ...] = ("standard", "separate")
    formats: tuple[str, ...] = tuple(FORMATS)


QUICK = Settings(steps=40, seeds=1, eval_every=20, eval_size=128, formats=("reference",))


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
class PointerModel(nn.Module):
    """Embeddings of the chosen format -> a (Nexus) Qwen2ForCausalLM over K output ids."""

    def __init__(self, settings: Settings, depth: int, variant: str, fmt: Format, mlp_hidden: int):
        super().__init__()
        k, d = settings.symbols, settings.dim
        self.fmt = fmt
        self.edge = nn.Embedding(k * k if fmt.embedding == "edge" else k, d)
        self.dst = nn.Embedding(k, d) if fmt.embedding == "factored" else None
        self.query = nn.Embedding(k, d)
        self.lm = _qwen2(settings, depth, variant, mlp_hidden)
        if fmt.init == "torch":
            _torch_default_init(self)
        else:
            for emb in (self.edge, self.dst, self.query):
                if emb is not None:
                    nn.init.normal_(emb.weight, std=self.lm.config.initializer_range)

    def forward(self, edges: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        k = self.query.num_embeddings
        if self.dst is None:
            x = self.edge(edges[..., 0] * k + edges[..., 1])  # (B, K, d): one id per (src, dst)
        else:
            x = self.edge(edges[..., 0]) + self.dst(edges[..., 1])
        x = torch.cat([x, self.query(query)[:, None]], dim=1)  # (B, K+1, d): the query comes last
        n = x.shape[1]
        positions = torch.arange(n) if self.fmt.positions == "rope" else torch.zeros(n, dtype=torch.long)
        # An explicit all-ones mask: without one, transformers reads position_ids that restart at 0 as
        # packed sequences and lets each token attend only to itself.
        mask = torch.ones(x.shape[:2], dtype=torch.long)
        out = self.lm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=positions.expand(x.shape[0], n),
            logits_to_keep=1,
        )
        return out.logits[:, -1]  # (B, K)


def _qwen2(settings: Settings, depth: int, variant: str, mlp_hidden: int) -> nn.Module:
    """A Qwen2ForCausalLM with K output ids; converted to Nexus-QK `variant` unless standard."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..converter import convert
    from ..modeling import NexusConfig

    config = Qwen2Config(
        vocab_size=settings.symbols,  # the LM head is the classifier; its input embeddings are unused
        hidden_size=settings.dim,
        intermediate_size=mlp_hidden,
        num_hidden_layers=depth,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config)
    if variant != "standard":  # gate zero, inner random: starts as exactly the standard model
        model = convert(model, NexusConfig(order=2, projections="qk", inner=variant, gate="zero"))
    return model


def _torch_default_init(model: nn.Module) -> None:
    """PyTorch's default init for every Linear and Embedding (Nexus gates and norms keep their start)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.reset_parameters()


def build(
    settings: Settings, depth: int, variant: str, target_params: int | None = None, fmt: Format = Format()
) -> PointerModel:
    """The model of `variant`, its MLP width chosen so the total is closest to target_params."""
    d = settings.dim
    if target_params is None:
        return PointerModel(settings, depth, variant, fmt, 4 * d)
    per_unit = depth * 3 * d  # one more SwiGLU hidden unit: gate, up and down projections of every layer
    base = count_parameters(PointerModel(settings, depth, variant, fmt, 1)) - per_unit
    hidden = max(1, round((target_params - base) / per_unit))
    return PointerModel(settings, depth, variant, fmt, hidden)


def target_parameters(settings: Settings, depth: int, fmt: Format = Format()) -> int:
    """The reference size: Nexus-QK `separate` with MLP hidden 4d."""
    return count_parameters(build(settings, depth, "separate", fmt=fmt))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, less the LM's input embeddings (unused: the sequence comes in as embeddings)."""
    unused = (
        sum(p.numel() for p in model.lm.get_input_embeddings().parameters()) if hasattr(model, "lm") else 0
    )
    return sum(p.numel() for p in model.parameters() if p.requires_grad) - unused


# ------------------------------------------------------------------------------------ training
@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    edges, query, answer = data
    model.eval()
    logits = model(edges, query)
    model.train()
    loss = nn.functional.cross_entropy(logits, answer)
    return float((logits.argmax(-1) == answer).float().mean()), float(loss)


def train_one(
    settings: Settings,
    depth: int,
    variant: str,
    seed: int,
    eval_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    fmt: Format = Format(),
) -> dict[str, Any]:
    """Adam on fresh batches (no data reuse); held-out accuracy every eval_every steps."""
    target = target_parameters(settings, depth, fmt)
    set_seed(seed)
    model = build(settings, depth, variant, target, fmt)
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
        "mlp_hidden": model.lm.config.intermediate_size,
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
        "variants": {k: VARIANTS[k] for k in settings.variants},
        "formats": {k: dataclasses.asdict(FORMATS[k]) for k in settings.formats},
        "chance_accuracy": 1 / settings.symbols,
        "runs": {},
    }
    for name in settings.formats:
        for depth in settings.depths:
            results["runs"][f"{name}/{depth}-layer"] = {
                v: [
                    train_one(settings, depth, v, seed, eval_data, FORMATS[name])
                    for seed in range(settings.seeds)
                ]
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
        f"sequences; mean ± std over seeds {results['seeds']}. Parameter counts matched within each format "
        "and depth. Models: Qwen2ForCausalLM from a Qwen2Config, Nexus variants through `convert` (gate zero, "
        "inner random). Columns are `format/depth`; formats (positions, embedding, init): "
        + "; ".join(
            f"{k} = {f['positions']}, {f['embedding']}, {f['init']}" for k, f in results["formats"].items()
        )
        + ".\n",
    ]
    depths = list(results["runs"])
    rows = []
    for key in depths:  # one row per (format/depth, variant): the formats are the study's axis
        for v, label in results["variants"].items():
            runs = results["runs"][key][v]
            hits = [next((str(st) for st, a, _ in r["curve"] if a >= 0.9), "-") for r in runs]
            rows.append(
                [
                    key,
                    label,
                    runs[0]["parameters"],
                    fmt_mean_std([r["final_accuracy"] for r in runs], 3),
                    fmt_mean_std([r["best_accuracy"] for r in runs], 3),
                    ", ".join(f"{r['final_accuracy']:.2f}" for r in runs),
                    ", ".join(hits),
                ]
            )
    headers = ["format/depth", "variant", "params", "final acc", "best acc", "per seed", "first step ≥ 0.9"]
    lines.append(markdown_table(headers, rows))
    secs = {d: sum(r["seconds"] for v in results["runs"][d].values() for r in v) for d in depths}
    lines.append(
        f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU in all ({', '.join(f'{d}: {t:.0f} s' for d, t in secs.items())}; "
        f"{results['environment']['torch_threads']} torch thread(s)).\n"
    )
    return "\n".join(lines)


def render_plot(results: dict[str, Any]) -> Figure:
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
    fig.suptitle("Multihop (Qwen2 + convert): two-hop pointer chasing (mean ± std over seeds)")
    fig.tight_layout()
    return fig


__all__ = [
    "FORMATS",
    "NAME",
    "QUICK",
    "Format",
    "Settings",
    "VARIANTS",
    "build",
    "make_batch",
    "mean_std",
    "run",
]
