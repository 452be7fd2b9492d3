"""Experiment `expressivity`: Theorem 3.1 (the linear bottleneck of attention) made concrete.

A single attention layer with linear Q/K has logits S = X Wq Wk^T X^T s: every row of S lies in
col(X), so a target A = softmax(1 a^T) with `a` outside span(col(X) ∪ 1) cannot be represented
(Theorem 3.1). We fit one attention map per variant by Adam and report KL(A || softmax(S)):

* `standard` (linear Q/K), next to the exact optimum of the linear class: with d_k = d, W = Wq Wk^T
  ranges over all d x d matrices, the KL is convex in the logits and the logits are linear in W,
  so the minimum is found to machine precision by Newton's method in float64 (`linear_optimum`);
* Nexus-QK `separate` / `shared` / `self` (layers.NexusMixer, the equations of modeling_nexus.py);
* `mlp` control: X_p = X + g_p * MLP_p(X), token-wise, parameter-matched to `separate`. It is
  nonlinear (so Theorem 3.1 does not bind it) but does not mix context: only targets whose pattern
  depends on *which other tokens are present* can tell Nexus's context mixing from plain
  nonlinearity.

Targets: `rank1` (Theorem 3.1's construction, one fixed X with n > d + 1), `lowrank` (random
rank-r log-A, one fixed X), and two context-dependent targets over a distribution of sequences
(fit on a training set, scored on held-out sequences): `cue` (attend to tokens whose colour
matches that of a marked cue token) and `majority` (attend to tokens in proportion to how many
tokens share their colour). For both, the pattern of every query depends on tokens other than the
query and the key, which no token-wise Q/K can see. Masking: none (full bidirectional attention,
A is over all n tokens) for every variant and every inner attention.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME = "expressivity"

VARIANTS: dict[str, MixerSpec] = QK_VARIANTS


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and budget. Full run: these defaults; `--quick`: QUICK."""

    n: int = 16  # tokens of the fixed-X targets (n > d + 1)
    d: int = 4  # width = d_k of the fixed-X targets (one head)
    rank: int = 2  # rank of the `lowrank` log-A
    target_scale: float = 2.0  # std of the target logits of rank1/lowrank
    ctx_n: int = 12  # tokens per sequence of the context targets
    ctx_colors: int = 4  # hidden attribute ("colour") values
    ctx_train: int = 128  # training sequences
    ctx_test: int = 1024  # held-out sequences
    cue_beta: float = 3.0  # logit bonus of tokens matching the cue's colour
    majority_beta: float = 8.0  # logit = beta * (fraction of tokens sharing the key's colour)
    steps: int = 1000  # Adam steps, full batch, same for every variant
    lr: float = 1e-2
    seeds: int = 5
    log_every: int = 50
    targets: tuple[str, ...] = ("rank1", "lowrank", "cue", "majority")

    @property
    def ctx_d(self) -> int:
        """Context-token width: one-hot over 2C token types, then C free dimensions."""
        return 3 * self.ctx_colors


QUICK = Settings(steps=80, seeds=1, ctx_train=32, ctx_test=64, log_every=20)


# ------------------------------------------------------------------------------------- targets
@dataclasses.dataclass
class Target:
    """A target attention map: inputs x (B, n, d) and row-normalised log A (B, n, n)."""

    name: str
    x_train: torch.Tensor
    log_a_train: torch.Tensor
    x_test: torch.Tensor
    log_a_test: torch.Tensor
    info: dict[str, float] = dataclasses.field(default_factory=dict)


def span_residual(x: torch.Tensor, a: torch.Tensor) -> float:
    """Relative least-squares residual ||a - B c*|| / ||a|| of `a` on B = [X, 1] (1 = outside the span)."""
    basis = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1).double()  # (n, d+1)
    coef = torch.linalg.lstsq(basis, a.double().unsqueeze(1)).solution
    return float((a.double() - (basis @ coef).squeeze(1)).norm() / a.double().norm())


def rank1_target(settings: Settings, gen: torch.Generator) -> Target:
    """Theorem 3.1: A = softmax(1 a^T) (every row softmax(a)) with a ⟂ span(col(X) ∪ 1)."""
    n, d = settings.n, settings.d
    x = torch.randn(n, d, generator=gen)
    basis = torch.cat([x, torch.ones(n, 1)], dim=1).double()  # (n, d+1)
    a = torch.randn(n, generator=gen).double()
    a = a - basis @ torch.linalg.lstsq(basis, a.unsqueeze(1)).solution.squeeze(1)  # project out the span
    a = (a / a.std() * settings.target_scale).float()
    log_a = a.log_softmax(-1).expand(n, n)[None]  # (1, n, n): every row the same
    x = x[None]
    return Target("rank1", x, log_a, x, log_a, {"span_residual": span_residual(x[0], a)})


def lowrank_target(settings: Settings, gen: torch.Generator) -> Target:
    """Random rank-r log-attention: A = row-softmax(U V^T), U, V in R^{n x r}."""
    n, d, r = settings.n, settings.d, settings.rank
    x = torch.randn(1, n, d, generator=gen)
    u, v = torch.randn(n, r, generator=gen), torch.randn(n, r, generator=gen)
    logits = u @ v.T / math.sqrt(r) * settings.target_scale  # (n, n), entries of std target_scale
    log_a = logits.log_softmax(-1)[None]
    return Target("lowrank", x, log_a, x, log_a)


def _context_tokens(
    settings: Settings, batch: int, gen: torch.Generator, cue: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens x = [one-hot of the token type (colour, is-cue), zeros]; returns x (B, n, d), colours (B, n), cue index (B,).

    One-hot types make every token-wise function of a token linear in x, so on these targets the
    exact linear optimum is also the optimum over *every* token-wise (context-free) Q/K map,
    however nonlinear: the `mlp` control cannot beat it on the training set. The trailing
    zero dimensions give an inner attention room to write what it gathered from the context.
    """
    n, c = settings.ctx_n, settings.ctx_colors
    colours = torch.randint(0, c, (batch, n), generator=gen)
    cue_idx = torch.randint(0, n, (batch,), generator=gen)
    is_cue = torch.zeros(batch, n, dtype=torch.long)
    if cue:
        is_cue[torch.arange(batch), cue_idx] = 1
    types = torch.nn.functional.one_hot(colours + c * is_cue, 2 * c).float()  # (B, n, 2C)
    x = torch.cat([types, torch.zeros(batch, n, settings.ctx_d - 2 * c)], dim=-1)  # (B, n, d)
    return x, colours, cue_idx


def _cue_log_a(settings: Settings, colours: torch.Tensor, cue_idx: torch.Tensor) -> torch.Tensor:
    """logit_ij = beta * [colour_j == colour_cue], the same for every query i."""
    cue_colour = colours.gather(1, cue_idx[:, None])  # (B, 1)
    logits = settings.cue_beta * (colours == cue_colour).float()  # (B, n)
    return logits.log_softmax(-1)[:, None, :].expand(-1, settings.ctx_n, -1)  # (B, n, n)


def _majority_log_a(settings: Settings, colours: torch.Tensor) -> torch.Tensor:
    """logit_ij = beta * (number of tokens with colour_j) / n, the same for every query i."""
    same = (colours[:, :, None] == colours[:, None, :]).float()  # (B, n, n)
    logits = settings.majority_beta * same.sum(-1) / settings.ctx_n  # (B, n)
    return logits.log_softmax(-1)[:, None, :].expand(-1, settings.ctx_n, -1)


def context_target(name: str, settings: Settings, gen: torch.Generator) -> Target:
    """`cue` or `majority`: a training set and a held-out set of sequences."""
    sets = []
    for batch in (settings.ctx_train, settings.ctx_test):
        x, colours, cue_idx = _context_tokens(settings, batch, gen, cue=name == "cue")
        log_a = (
            _cue_log_a(settings, colours, cue_idx) if name == "cue" else _majority_log_a(settings, colours)
        )
        sets.append((x, log_a))
    (x_tr, a_tr), (x_te, a_te) = sets
    return Target(name, x_tr, a_tr, x_te, a_te)


def make_target(name: str, settings: Settings, seed: int) -> Target:
    gen = torch.Generator().manual_seed(10_000 + seed)
    if name == "rank1":
        return rank1_target(settings, gen)
    if name == "lowrank":
        return lowrank_target(settings, gen)
    if name in ("cue", "majority"):
        return context_target(name, settings, gen)
    raise ValueError(f"unknown target {name!r}")


# ------------------------------------------------------------------------------------- fitting
def kl_to_target(log_a: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(A_i || softmax(S_i)); log_a, logits (B, n, n)."""
    return (log_a.exp() * (log_a - logits.log_softmax(-1))).sum(-1).mean()


def linear_optimum(
    x: torch.Tensor, log_a: torch.Tensor, max_iter: int = 50, tol: float = 1e-14
) -> dict[str, Any]:
    """Exact minimum over W of KL(A || softmax(X W X^T)) (linear Q/K with d_k = d), by Newton in float64.

    Convex: the KL is convex in each row of logits (log-sum-exp minus a linear term) and
    S = X W X^T is linear in W. Directions that shift a row by a constant are in the Hessian's
    null space (the KL is flat along them), so the Newton step uses the pseudo-inverse; a
    backtracking line search makes every step a descent step. Stops when half the squared Newton
    decrement, lambda^2 / 2 = -grad . step / 2 (the predicted remaining decrease), is below `tol`.
    Returns W, the KL, the final gradient norm and Newton decrement (the convergence checks).
    """
    x, log_a = x.double(), log_a.double()
    d = x.shape[-1]

    def f(w: torch.Tensor) -> torch.Tensor:
        s = x @ w.view(d, d) @ x.transpose(-1, -2)  # (B, n, n)
        return kl_to_target(log_a, s)

    w = torch.zeros(d * d, dtype=torch.float64)
    grad_norm, decrement, iterations = math.inf, math.inf, 0
    while iterations < max_iter:
        iterations += 1
        w_ = w.clone().requires_grad_(True)
        value = f(w_)
        (grad,) = torch.autograd.grad(value, w_)
        hess = torch.autograd.functional.hessian(f, w)  # (d*d, d*d)
        step = -torch.linalg.pinv(hess, hermitian=True, rtol=1e-10) @ grad
        grad_norm, decrement = float(grad.norm()), float(-(grad @ step)) / 2
        if decrement < tol:
            break
        t, f0 = 1.0, float(value.detach())
        while float(f(w + t * step)) > f0 - 1e-4 * t * 2 * decrement and t > 1e-10:
            t *= 0.5
        if t <= 1e-10:  # no further decrease representable in float64
            break
        w = w + t * step
    return {
        "w": w.view(d, d),
        "kl": float(f(w)),
        "grad_norm": grad_norm,
        "decrement": decrement,
        "iterations": iterations,
    }


def parameter_counts(settings: Settings) -> dict[str, dict[str, int]]:
    """Parameters that shape the attention map (q, k, inner modules, gates) per variant and width."""
    counts: dict[str, dict[str, int]] = {}
    for d in sorted({settings.d, settings.ctx_d}):
        row = {}
        for name, spec in VARIANTS.items():
            model = NexusMixer(d, 1, d, spec, causal=False)
            # The outer V/O do not shape the map, except in `shared`, whose inner pass uses them.
            unused = (
                0
                if spec.variant == "shared"
                else count_parameters(model.attn.v_proj) + count_parameters(model.attn.o_proj)
            )
            row[name] = count_parameters(model) - unused
        counts[f"d={d}"] = row
    return counts


def fit(spec: MixerSpec, target: Target, settings: Settings, seed: int) -> dict[str, Any]:
    """Adam on the KL for a fixed budget; returns the final train/held-out KL and the curve."""
    set_seed(seed)
    d = target.x_train.shape[-1]
    model = NexusMixer(d, 1, d, spec, causal=False)  # one head, d_k = d, no mask
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    held_out = target.x_test is not target.x_train
    curve: list[tuple[int, float]] = []

    def evaluate() -> float:
        with torch.no_grad():
            return float(kl_to_target(target.log_a_test, model.attention_logits(target.x_test)[:, 0]))

    for step in range(settings.steps + 1):
        if step % settings.log_every == 0 or step == settings.steps:
            curve.append((step, evaluate()))
        if step == settings.steps:
            break
        loss = kl_to_target(target.log_a_train, model.attention_logits(target.x_train)[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_kl = float(kl_to_target(target.log_a_train, model.attention_logits(target.x_train)[:, 0]))
    return {"train_kl": train_kl, "eval_kl": curve[-1][1], "held_out": held_out, "curve": curve}


# ---------------------------------------------------------------------------------------- run
def run(
    output_dir: Path, quick: bool = False, seeds: int | None = None, threads: int = 1
) -> ExperimentOutput:
    """Fit every variant to every target for `seeds` seeds; write JSON, markdown and PNG."""
    settings = QUICK if quick else Settings()
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    limit_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    results: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "settings": {**dataclasses.asdict(settings), "ctx_d": settings.ctx_d},
        "seeds": list(range(settings.seeds)),
        "variants": {k: v.label for k, v in VARIANTS.items()},
        "parameters": parameter_counts(settings),
        "targets": {},
    }
    for tname in settings.targets:
        per_seed: list[dict[str, Any]] = []
        for seed in range(settings.seeds):
            target = make_target(tname, settings, seed)
            opt = linear_optimum(target.x_train, target.log_a_train)
            with torch.no_grad():
                x_te = target.x_test.double()
                s_te = x_te @ opt["w"] @ x_te.transpose(-1, -2)
                opt_eval = float(kl_to_target(target.log_a_test.double(), s_te))
            row: dict[str, Any] = {
                "seed": seed,
                "info": target.info,
                "linear_optimum": {
                    "train_kl": opt["kl"],
                    "eval_kl": opt_eval,
                    "grad_norm": opt["grad_norm"],
                    "newton_decrement": opt["decrement"],
                    "newton_iterations": opt["iterations"],
                },
                "fits": {name: fit(spec, target, settings, seed) for name, spec in VARIANTS.items()},
            }
            per_seed.append(row)
        results["targets"][tname] = per_seed
    results["runtime_s"] = round(time.time() - start, 1)
    results["cpu_s"] = round(time.process_time() - cpu_start, 1)
    results["environment"] = environment()
    out_dir = Path(output_dir)
    return write_outputs(NAME, out_dir, results, render_markdown(results), render_plot(results))


# ------------------------------------------------------------------------------------- report
def summary(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """{target: {variant or 'linear_optimum': [final held-out (or in-sample) KL per seed]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for tname, per_seed in results["targets"].items():
        table = {"linear_optimum": [r["linear_optimum"]["eval_kl"] for r in per_seed]}
        for name in results["variants"]:
            table[name] = [r["fits"][name]["eval_kl"] for r in per_seed]
        out[tname] = table
    return out


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    summ = summary(results)
    targets = list(summ)
    lines = [
        f"# Experiment `expressivity`{' (quick)' if results['quick'] else ''}\n",
        f"Final KL(A || softmax(S)), mean ± std over {len(results['seeds'])} seed(s) {results['seeds']}; "
        f"Adam lr {s['lr']}, {s['steps']} full-batch steps for every variant; one head, d_k = d; no mask. "
        "`rank1`/`lowrank`: in-sample fit of one fixed X "
        f"(n = {s['n']}, d = {s['d']}); `cue`/`majority`: {s['ctx_train']} training sequences, KL on "
        f"{s['ctx_test']} held-out sequences (n = {s['ctx_n']}, d = {s['ctx_d']}). "
        "The exact linear optimum is the global minimum over W = Wq Wk^T (Newton, float64), fitted on "
        "the same training data.\n",
    ]
    rows = []
    labels = {"linear_optimum": "linear Q/K, exact optimum (convex)", **results["variants"]}
    for key, label in labels.items():
        rows.append([label] + [fmt_mean_std(summ[t][key], 4) for t in targets])
    lines.append(markdown_table(["variant", *targets], rows))
    params = results["parameters"]
    lines.append("\nParameters that shape the attention map (q, k, inner modules, gates):\n")
    widths = list(params)
    lines.append(
        markdown_table(
            ["variant", *widths],
            [[results["variants"][v]] + [params[w][v] for w in widths] for v in results["variants"]],
        )
    )
    # Convergence of the convex solver and the rank-1 construction check.
    checks = []
    for tname, per_seed in results["targets"].items():
        gn = max(r["linear_optimum"]["grad_norm"] for r in per_seed)
        dec = max(r["linear_optimum"]["newton_decrement"] for r in per_seed)
        res = [r["info"].get("span_residual") for r in per_seed if "span_residual" in r["info"]]
        checks.append([tname, f"{gn:.1e}", f"{dec:.1e}", f"{min(res):.6f}" if res else "-"])
    lines.append(
        "\nChecks: the Newton solve's largest final gradient norm and half squared Newton decrement "
        "(predicted remaining KL decrease); relative least-squares residual of `a` on [X, 1] (1 = orthogonal):\n"
    )
    lines.append(markdown_table(["target", "max grad norm", "max decrement", "min span residual"], checks))
    ctx = [t for t in targets if t in ("cue", "majority")]
    if ctx:
        lines.append("\nContext targets, train vs held-out KL (overfitting check):\n")
        rows = []
        for v in results["variants"]:
            cells = []
            for t in ctx:
                tr = [r["fits"][v]["train_kl"] for r in results["targets"][t]]
                cells.append(f"{mean_std(tr)[0]:.4f} / {mean_std(summ[t][v])[0]:.4f}")
            rows.append([results["variants"][v], *cells])
        lines.append(markdown_table(["variant", *(f"{t} train / held-out" for t in ctx)], rows))
    lines.append(
        f"\nRuntime: {results['runtime_s']} s wall, {results['cpu_s']} s CPU ({results['environment']['torch_threads']} torch thread(s)).\n"
    )
    return "\n".join(lines)


def render_plot(results: dict[str, Any]) -> Figure:
    plt = pyplot()
    targets = list(results["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, tname in zip(axes[0], targets):
        per_seed = results["targets"][tname]
        for name, label in results["variants"].items():
            curves = torch.tensor([[kl for _, kl in r["fits"][name]["curve"]] for r in per_seed])  # (S, T)
            steps = [s for s, _ in per_seed[0]["fits"][name]["curve"]]
            mean = curves.mean(0)
            ax.plot(steps, mean.numpy(), label=label)
            if curves.shape[0] > 1:
                ax.fill_between(steps, curves.min(0).values.numpy(), curves.max(0).values.numpy(), alpha=0.15)
        opt = mean_std([r["linear_optimum"]["eval_kl"] for r in per_seed])[0]
        ax.axhline(opt, color="black", linestyle="--", linewidth=1, label="linear exact optimum")
        ax.set_yscale("log")
        ax.set_title(tname + (" (held-out)" if tname in ("cue", "majority") else " (in-sample)"))
        ax.set_xlabel("Adam step")
    axes[0][0].set_ylabel("KL(A || softmax(S))")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(
        "Expressivity: one attention layer fitted to a target attention map (mean, min–max band over seeds)"
    )
    fig.tight_layout()
    return fig
