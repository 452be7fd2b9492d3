"""What Nexus costs by count, not by clock: FLOPs per training token, kernels per decode step, bytes.

Timings need the hardware they are about; counts do not. They bound what any implementation can
reach on a GPU at real sizes:

* SFT at long sequences is compute-bound: tokens/s relative to the base model is at most
  FLOPs(base) / FLOPs(Nexus). Counted with torch's FlopCounterMode on the meta device (no memory,
  no time), so 0.5B-7B shapes cost nothing. Causal attention is counted at half of n^2, which is
  what FlashAttention-style kernels execute (the counter itself counts all of n^2).
* Decoding one token at batch 1 in eager PyTorch is launch-bound: the ratio is about
  kernels(base) / kernels(Nexus) per step. Counted by dispatching one cached decode step of a small
  model with the same layer structure (the count does not depend on widths) and extrapolating
  linearly in the number of layers (exact: every layer runs the same ops).
* Decoding at larger batch becomes memory-bound: weights and KV cache read per step.

These are exact counts of the code as it runs here; the README states which GPU goals they allow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from ..converter import nexus_model_config
from ..inspection import cache_slots
from ..modeling import NexusConfig
from ..modeling.compat import cache_kwargs
from ..modeling.modeling_nexus import NexusQwen2ForCausalLM
from ..safe_output import atomic_write_text
from .shapes import SHAPES, VARIANTS

# aten ops that only re-describe memory: no kernel runs for them
_VIEW_OPS = frozenset(
    "view _unsafe_view reshape _reshape_alias transpose t permute unsqueeze squeeze expand slice "
    "select split split_with_sizes chunk unbind alias as_strided detach lift_fresh".split()
)
# On the meta device SDPA decomposes into its math path: the attention matmuls are the model's only
# batched matmuls (tests/bench/test_counts.py pins this), and the fused kernels' names are listed too.
_ATTENTION_OPS = ("aten.bmm", "scaled_dot_product", "flash_attention", "efficient_attention")


class KernelCounter(TorchDispatchMode):
    """Counts aten ops that launch work (views excluded)."""

    def __init__(self):
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func.overloadpacket.__name__ not in _VIEW_OPS:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def _build(
    config: dict, nexus: NexusConfig | None, layers: int, device: str | torch.device
) -> Qwen2ForCausalLM:
    fields = {**config, "num_hidden_layers": layers}
    with torch.device(device):
        base = Qwen2Config(**fields)
        base._attn_implementation = "sdpa"
        if nexus is None:
            return Qwen2ForCausalLM(base)
        return NexusQwen2ForCausalLM(nexus_model_config(base, nexus))


def train_flops(config: dict, nexus: NexusConfig | None, seq_len: int, layers: int) -> float:
    """FLOPs of one forward+backward on one sequence, causal attention counted at half."""
    model = _build(config, nexus, layers, "meta")
    ids = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    total = 0.0
    for op, flops in counter.get_flop_counts()["Global"].items():
        total += flops * (0.5 if any(a in str(op) for a in _ATTENTION_OPS) else 1.0)
    return total


def decode_kernels(config: dict, nexus: NexusConfig | None, layers: int, prompt_len: int = 16) -> int:
    """Kernels launched by one cached greedy decode step (batch 1) after a prompt."""
    groups = config["num_attention_heads"] // config["num_key_value_heads"]
    # Same structure (GQA grouping, biases, tying) at small widths: widths do not change the count.
    small = {**config, "num_attention_heads": 2 * groups, "num_key_value_heads": 2, "vocab_size": 128}
    small.update(hidden_size=16 * groups, intermediate_size=32 * groups)  # head_dim 8
    model = _build(small, nexus, layers, "cpu").eval()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(torch.ones((1, prompt_len), dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
        with KernelCounter() as counter:
            model(
                torch.ones((1, 1), dtype=torch.long),
                **cache_kwargs(model, cache),
                use_cache=True,
                position_ids=torch.tensor([[prompt_len]]),
            )
    return counter.kernels


def _per_layer(fn: Callable[..., float], config: dict, nexus: NexusConfig | None, **kwargs) -> float:
    """fn at the config's depth, from fn at 1 and 2 layers (every layer runs the same ops)."""
    one, two = fn(config, nexus, layers=1, **kwargs), fn(config, nexus, layers=2, **kwargs)
    return one + (two - one) * (config["num_hidden_layers"] - 1)


def model_train_flops(config: dict, nexus: NexusConfig | None, seq_len: int) -> float:
    """Training FLOPs of one sequence at the config's full depth."""
    return _per_layer(train_flops, config, nexus, seq_len=seq_len)


def parameters_and_cache(config: dict, nexus: NexusConfig | None) -> tuple[int, float]:
    """Parameter count, and KV-cache bytes per token relative to the base model's."""
    model = _build(config, nexus, config["num_hidden_layers"], "meta")
    cached = sum(slot.kv_heads for slot in cache_slots(model.config))
    return sum(p.numel() for p in model.parameters()), cached / config["num_key_value_heads"]


@dataclass
class CountRow:
    shape: str
    variant: str
    train_flops_per_token: float
    decode_kernels_per_step: int
    parameters: int
    kv_cache_ratio: float  # KV-cache bytes per token relative to the base model's
    # relative to the base model of the same shape: the best tokens/s ratio each regime allows
    sft_compute_bound: float
    decode_launch_bound: float
    decode_weight_bound: float


def count_all(seq_len: int = 2048, shapes: dict[str, dict] | None = None) -> list[CountRow]:
    rows: list[CountRow] = []
    for shape, config in (shapes or SHAPES).items():
        counted = [
            (
                label,
                model_train_flops(config, nexus, seq_len) / seq_len,
                int(_per_layer(decode_kernels, config, nexus)),
                *parameters_and_cache(config, nexus),
            )
            for label, nexus in VARIANTS
        ]
        _, base_flops, base_kernels, base_params, _ = counted[0]  # VARIANTS starts with the base
        for label, flops, kernels, params, cache_ratio in counted:
            rows.append(
                CountRow(
                    shape,
                    label,
                    flops,
                    kernels,
                    params,
                    cache_ratio,
                    base_flops / flops,
                    base_kernels / kernels,
                    base_params / params,
                )
            )
    return rows


def write_counts(rows: list[CountRow], out_dir: Path, seq_len: int) -> Path:
    """counts.json + counts.md, each written to a temporary name first."""
    md = [
        "# What Nexus costs by count (hardware-independent)",
        "",
        f"Training FLOPs per token at sequence length {seq_len} (forward+backward, causal attention "
        "at half of n^2); kernels launched by one cached decode step at batch 1; parameters. "
        "Each `bound` column is base / Nexus: the best tokens/s ratio that regime allows "
        "(compute-bound SFT, launch-bound eager decoding, weight-bandwidth-bound decoding).",
        "",
        "| shape | variant | GFLOPs/token | SFT bound | kernels/step | decode launch bound | "
        "params (M) | decode weight bound | KV cache x base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r.shape} | {r.variant} | {r.train_flops_per_token / 1e9:.2f} | {r.sft_compute_bound:.2f} | "
            f"{r.decode_kernels_per_step} | {r.decode_launch_bound:.2f} | {r.parameters / 1e6:.0f} | "
            f"{r.decode_weight_bound:.2f} | {r.kv_cache_ratio:.1f} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"seq_len": seq_len, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    for name, text in (("counts.json", json.dumps(payload, indent=2)), ("counts.md", "\n".join(md) + "\n")):
        atomic_write_text(out_dir / name, text)
    return out_dir / "counts.md"
