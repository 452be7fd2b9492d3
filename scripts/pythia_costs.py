"""What the Pythia pretraining runs cost, baseline and Nexus: parameters, FLOPs, GPU-hours.

    python scripts/pythia_costs.py            # prints the markdown table of recipes/README.md

Counted, not timed (nothing runs on a GPU): each model is built on the meta device from Pythia's
published shape (EleutherAI/pythia models/*/pythia-*.yml) with this package's classes, and one
forward+backward of a 2048-token sequence is counted by torch's FlopCounterMode with the rule of
`nexus-retrofit bench counts` (nexus_retrofit/bench/counts.py): causal attention at half of n^2, as
FlashAttention-style kernels execute it. Depth is extrapolated from 1 and 2 layers (every layer runs
the same ops), as bench counts does. Tokens: Pythia's 143,000 steps x 1024 x 2048 = 299,892,736,000.
GPU-hours = FLOPs / (peak x utilisation); the utilisation is an assumption, stated in the table.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from nexus_retrofit.bench.counts import _ATTENTION_OPS  # the one rule for causal attention FLOPs
from nexus_retrofit.converter import nexus_model_config
from nexus_retrofit.modeling import FAMILIES, NexusConfig

TOKENS = 143_000 * 1024 * 2048
SEQ_LEN = 2048
# (layers, hidden, heads) of models/{70M,160M,410M,1B}/pythia-*.yml; all: rotary-pct 0.25,
# gpt-j-residual (parallel), no weight tying, intermediate 4 x hidden, vocab padded to 50304
SIZES = {"70M": (6, 512, 8), "160M": (12, 768, 12), "410M": (24, 1024, 16), "1B": (16, 2048, 8)}
VARIANTS = [  # the recipes of recipes/Pythia-70M/pretrain (the paper's form: no gate)
    ("baseline", None),
    ("QK separate m=2", NexusConfig(gate="none")),
    ("Q separate m=2", NexusConfig(projections="q", gate="none")),
    ("QKV separate m=2", NexusConfig(projections="qkv", gate="none")),
    ("QK shared m=2", NexusConfig(inner="shared", gate="none")),
    ("QK separate m=3", NexusConfig(order=3, gate="none")),
]
A100_FP16 = 312e12  # dense fp16/bf16 tensor-core peak of an A100 (Pythia's hardware), FLOP/s
UTILISATION = 0.4  # assumed model-FLOPs utilisation; small models often reach less


def pythia_config(size: str, layers: int | None = None) -> GPTNeoXConfig:
    depth, hidden, heads = SIZES[size]
    return GPTNeoXConfig(
        num_hidden_layers=depth if layers is None else layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )


def build(config: GPTNeoXConfig, nexus: NexusConfig | None) -> torch.nn.Module:
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        if nexus is None:
            return GPTNeoXForCausalLM(config)
        return FAMILIES["gpt_neox"][1](nexus_model_config(config, nexus))


def train_flops(config: GPTNeoXConfig, nexus: NexusConfig | None, seq_len: int = SEQ_LEN) -> float:
    """FLOPs of one forward+backward over one sequence, causal attention at half."""
    model = build(config, nexus)
    ids = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    return sum(
        flops * (0.5 if any(a in str(op) for a in _ATTENTION_OPS) else 1.0)
        for op, flops in counter.get_flop_counts()["Global"].items()
    )


def flops_per_token(size: str, nexus: NexusConfig | None) -> float:
    one, two = (train_flops(pythia_config(size, n), nexus) for n in (1, 2))
    return (one + (two - one) * (SIZES[size][0] - 1)) / SEQ_LEN


def parameters(size: str, nexus: NexusConfig | None) -> tuple[int, int]:
    """(all parameters, all but the input embedding: what 6ND's N counts as matmul weights)."""
    model = build(pythia_config(size), nexus)
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def table(sizes: list[str]) -> str:
    rows = [
        "| size | variant | parameters | 6·N·D | counted FLOPs | Nexus overhead (counted) | x baseline | "
        f"A100-hours at {UTILISATION:.0%} of {A100_FP16 / 1e12:.0f} TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        base = None
        for label, nexus in VARIANTS:
            total, matmul = parameters(size, nexus)
            flops = flops_per_token(size, nexus) * TOKENS
            base = flops if base is None else base
            hours = flops / (A100_FP16 * UTILISATION) / 3600
            overhead = f"+{flops - base:.2e}" if nexus is not None else "–"
            rows.append(
                f"| {size} | {label} | {total / 1e6:.1f}M | {6 * matmul * TOKENS:.2e} | {flops:.2e} | {overhead} | "
                f"{flops / base:.2f} | {hours:,.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="Comma-separated: 70M,160M,410M,1B.")
    args = parser.parse_args()
    print(table(args.sizes.split(",")))


if __name__ == "__main__":
    main()
