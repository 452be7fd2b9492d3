"""Speed and memory of Nexus attention against the base model, measured side by side in one process.

1. One attention layer, forward and forward+backward, base vs each Nexus variant, across sequence
   lengths: time ratio against the floor `distinct calls x base layer time` (goal <= 1.15) and the
   largest activation (must grow linearly in n on the sdpa/flash paths).
2. Whole model: SFT step tokens/s and cached greedy decode tokens/s (batch 1 and 32).

Medians over repeats, warm-up excluded. Results go to JSON + markdown + PNG with device and versions.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from ..converter import convert
from ..modeling import NexusConfig
from ..modeling.names import is_gate
from ..safe_output import atomic_write_text, save_figure
from .counts import model_train_flops
from .shapes import LAYER_CONFIG, QWEN_05B_CONFIG, TINY_MODEL_CONFIG, VARIANTS


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired_times(
    base: Callable[[], object], variant: Callable[[], object], device: str, repeats: int, warmup: int = 1
) -> tuple[float, float, float]:
    """Medians of base time, variant time and variant/base, timed alternately (A/B/A/B...).

    Alternating puts both under the same machine state (clock, other tenants), so their ratio
    holds even where absolute times drift between runs, as they do on shared machines.
    """
    for _ in range(warmup):
        base()
        variant()
    pairs = [(_timed(base, device), _timed(variant, device)) for _ in range(repeats)]
    return (
        statistics.median(b for b, _ in pairs),
        statistics.median(v for _, v in pairs),
        statistics.median(v / b for b, v in pairs),
    )


class _LargestTensor(TorchDispatchMode):
    """Largest tensor (bytes) produced by any op: shows whether an n x n matrix appears."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def build_model(
    nexus: NexusConfig | None,
    config: dict,
    device: str,
    dtype: torch.dtype,
    attn: str,
    layers: int | None = None,
) -> PreTrainedModel:
    """A random model of `config` (optionally converted), with non-zero gates so nothing is skipped."""
    fields = {**config, **({"num_hidden_layers": layers} if layers else {})}
    base_config = Qwen2Config(**fields)
    base_config._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(base_config)
    if nexus is not None:
        model = convert(model, nexus)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_gate(name):
                    p.fill_(0.1)
    return model.to(device=device, dtype=dtype)


@dataclass
class LayerResult:
    variant: str
    seq_len: int
    distinct_calls: int
    forward_ms: float
    train_ms: float
    forward_ratio: float  # time / (distinct calls x base time): 1.0 is the floor
    train_ratio: float
    largest_activation_mib: float
    peak_memory_mib: float | None


def _causal_mask(n: int, attn: str, device: str, dtype: torch.dtype) -> torch.Tensor | None:
    # sdpa/flash take no mask for unpadded causal input (is_causal); eager needs the additive mask.
    if attn != "eager":
        return None
    return torch.full((n, n), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]


def _layer_steps(
    nexus: NexusConfig | None,
    layer_config: dict,
    x: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    device: str,
    dtype: torch.dtype,
    attn: str,
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor | None]], Callable[[], None]]:
    """Forward and forward+backward closures of one attention layer on fixed inputs."""
    model = build_model(nexus, {**layer_config, "vocab_size": 128}, device, dtype, attn, layers=1)
    layer = model.model.layers[0].self_attn
    cos_sin = model.model.rotary_emb(x, pos)

    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return layer(x, position_embeddings=cos_sin, attention_mask=mask)

    def train_step() -> None:
        out, _ = layer(x.detach().requires_grad_(), position_embeddings=cos_sin, attention_mask=mask)
        out.float().sum().backward()

    return forward, train_step


def bench_layer(
    seq_lens: list[int],
    device: str,
    dtype: torch.dtype,
    attn: str,
    repeats: int,
    batch: int = 1,
    layer_config: dict | None = None,
) -> list[LayerResult]:
    layer_config = layer_config or LAYER_CONFIG
    results: list[LayerResult] = []
    for n in seq_lens:
        mask = _causal_mask(n, attn, device, dtype)
        x = torch.randn(batch, n, layer_config["hidden_size"], device=device, dtype=dtype)
        pos = torch.arange(n, device=device)[None].expand(batch, n)

        setup = (layer_config, x, pos, mask, device, dtype, attn)
        base_forward, base_train = _layer_steps(None, *setup)
        for label, nexus in VARIANTS:
            forward, train_step = _layer_steps(nexus, *setup)
            _, fwd, fwd_ratio = paired_times(base_forward, forward, device, repeats)
            _, trn, trn_ratio = paired_times(base_train, train_step, device, repeats)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                train_step()
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = None
            with _LargestTensor() as probe:
                forward()
            calls = nexus.distinct_attention_calls if nexus else 1
            results.append(
                LayerResult(
                    label,
                    n,
                    calls,
                    fwd * 1e3,
                    trn * 1e3,
                    fwd_ratio / calls,
                    trn_ratio / calls,
                    probe.largest / 2**20,
                    peak,
                )
            )
    return results


@dataclass
class ModelResult:
    variant: str
    train_tokens_per_s: float
    decode_tokens_per_s_b1: float
    decode_tokens_per_s_b32: float
    # tokens/s relative to the base model, medians of ratios of alternating (paired) timings
    train_vs_base: float = 1.0
    decode_b1_vs_base: float = 1.0
    decode_b32_vs_base: float = 1.0
    # FLOPs(base) / FLOPs(variant) of the same training step: the compute-bound ceiling of train_vs_base
    train_flop_bound: float = 1.0


def _model_steps(
    nexus: NexusConfig | None,
    config: dict,
    device: str,
    dtype: torch.dtype,
    attn: str,
    ids: torch.Tensor,
    prompts: dict,
    new_tokens: int,
) -> tuple[Callable[[], None], Callable[[int], None]]:
    """An SFT step closure (AdamW) and a greedy `generate(batch)` closure of one whole model."""
    model = build_model(nexus, config, device, dtype, attn)
    model.generation_config.pad_token_id = 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> None:
        model.train()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def generate(batch: int) -> None:
        model.eval()
        with torch.no_grad():
            model.generate(
                prompts[batch], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    return train_step, generate


def bench_model(
    config: dict,
    device: str,
    dtype: torch.dtype,
    attn: str,
    repeats: int,
    train_len: int,
    prompt_len: int,
    new_tokens: int,
    train_batch: int = 8,
) -> list[ModelResult]:
    vocab = config["vocab_size"]
    ids = torch.randint(1, vocab, (train_batch, train_len), device=device)
    prompts = {b: torch.randint(1, vocab, (b, prompt_len), device=device) for b in (1, 32)}

    setup = (config, device, dtype, attn, ids, prompts, new_tokens)
    base_train, base_generate = _model_steps(None, *setup)
    base_flops = model_train_flops(config, None, train_len)
    results = []
    for label, nexus in VARIANTS:
        train_step, generate = _model_steps(nexus, *setup)
        _, train_s, train_ratio = paired_times(base_train, train_step, device, repeats)
        decode, ratios = {}, {}
        for b in (1, 32):
            _, seconds, ratio = paired_times(partial(base_generate, b), partial(generate, b), device, repeats)
            decode[b], ratios[b] = b * new_tokens / seconds, 1 / ratio
        results.append(
            ModelResult(
                label,
                train_batch * train_len / train_s,
                decode[1],
                decode[32],
                1 / train_ratio,
                ratios[1],
                ratios[32],
                base_flops / model_train_flops(config, nexus, train_len),
            )
        )
    return results


def environment(device: str) -> dict:
    import transformers

    env = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_report(out_dir: Path, payload: dict, layer: list[LayerResult], model: list[ModelResult]) -> Path:
    """JSON + markdown + PNG, each written to a temporary name first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = payload["environment"]["device"]
    md = [
        f"# Nexus speed ({tag})",
        "",
        f"`{json.dumps(payload['environment'])}`",
        "",
        f"Settings: `{json.dumps(payload['settings'])}`",
        "",
        "## One attention layer (Qwen2.5-0.5B shape), ratio = time / (distinct calls x base time)",
        "",
        "Every ratio is the median over alternating base/variant timings (paired), so machine drift "
        "between variants cancels.",
        "",
        "| variant | n | calls | fwd ms | fwd ratio | fwd+bwd ms | train ratio | largest activation MiB |"
        + (" peak MiB |" if tag == "cuda" else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if tag == "cuda" else ""),
    ]
    for r in layer:
        row = (
            f"| {r.variant} | {r.seq_len} | {r.distinct_calls} | {r.forward_ms:.1f} | {r.forward_ratio:.2f} | "
            f"{r.train_ms:.1f} | {r.train_ratio:.2f} | {r.largest_activation_mib:.1f} |"
        )
        md.append(row + (f" {r.peak_memory_mib:.0f} |" if tag == "cuda" else ""))
    md += [
        "",
        "## Whole model",
        "",
        "x base: median of paired ratios (the base row, base against a second base run, shows the "
        "noise). SFT FLOP bound: FLOPs(base) / FLOPs(variant) of the same step, the most a "
        "compute-bound step can reach (`bench counts`).",
        "",
        "| variant | SFT tokens/s | x base | SFT FLOP bound | decode tok/s b=1 | x base | decode tok/s b=32 | x base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in model:
        md.append(
            f"| {r.variant} | {r.train_tokens_per_s:.0f} | {r.train_vs_base:.2f} | {r.train_flop_bound:.2f} | "
            f"{r.decode_tokens_per_s_b1:.1f} | {r.decode_b1_vs_base:.2f} | "
            f"{r.decode_tokens_per_s_b32:.1f} | {r.decode_b32_vs_base:.2f} |"
        )
    files = {
        f"speed_{tag}.json": json.dumps(payload, indent=2),
        f"speed_{tag}.md": "\n".join(md) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, _ in VARIANTS[1:]:
        rows = [r for r in layer if r.variant == label]
        axes[0].plot([r.seq_len for r in rows], [r.train_ratio for r in rows], marker="o", label=label)
    axes[0].axhline(1.15, color="gray", ls="--", lw=1, label="goal 1.15")
    axes[0].set(
        xlabel="sequence length", ylabel="fwd+bwd time / (calls x base)", title="one layer", xscale="log"
    )
    axes[0].legend(fontsize=7)
    labels = [r.variant for r in model]
    axes[1].bar(labels, [r.train_vs_base for r in model], label="SFT")
    axes[1].bar(
        labels,
        [r.decode_b1_vs_base for r in model],
        alpha=0.5,
        label="decode b=1",
    )
    axes[1].set(ylabel="tokens/s relative to base", title="whole model")
    axes[1].tick_params(axis="x", rotation=45, labelsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir / f"speed_{tag}.png", dpi=110)
    return out_dir / f"speed_{tag}.md"


def run_speed_bench(
    device: str = "cpu",
    seq_lens: list[int] | None = None,
    quick: bool = False,
    out_dir: Path = Path("runs/perf"),
    attn: str = "sdpa",
) -> Path:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if seq_lens is None:
        seq_lens = (
            ([256, 512] if quick else [256, 512, 1024, 2048]) if device == "cpu" else [1024, 4096, 16384]
        )
    repeats = 2 if quick else 5
    layer = bench_layer(seq_lens, device, dtype, attn, repeats)
    if device == "cpu":
        model_cfg, train_len, prompt_len, new_tokens = TINY_MODEL_CONFIG, 256, 32, (8 if quick else 32)
    else:
        model_cfg, train_len, prompt_len, new_tokens = QWEN_05B_CONFIG, 2048, 128, 128
    model = bench_model(model_cfg, device, dtype, attn, repeats, train_len, prompt_len, new_tokens)
    payload = {
        "environment": environment(device),
        "settings": {
            "seq_lens": seq_lens,
            "repeats": repeats,
            "attn_implementation": attn,
            "dtype": str(dtype),
            "layer_config": LAYER_CONFIG,
            "model_config": model_cfg,
            "train_len": train_len,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "quick": quick,
        },
        "layer": [r.__dict__ for r in layer],
        "model": [r.__dict__ for r in model],
    }
    return write_report(out_dir, payload, layer, model)
