"""Model shapes and Nexus variants the benchmarks measure (random weights: speed needs no training)."""

from __future__ import annotations

from ..modeling import NexusConfig

# Variants measured: (label, NexusConfig or None for the base model)
VARIANTS: list[tuple[str, NexusConfig | None]] = [
    ("base", None),
    ("separate-qk-m2", NexusConfig(order=2, inner="separate")),
    ("shared-qk-m2", NexusConfig(order=2, inner="shared")),
    ("self-qk-m2", NexusConfig(order=2, inner="self")),
    ("separate-qk-m3", NexusConfig(order=3, inner="separate")),
    ("shared-qk-m3", NexusConfig(order=3, inner="shared")),
    ("self-qk-m3", NexusConfig(order=3, inner="self")),
]

# Layer shape of Qwen2.5-0.5B (hidden 896, 14 heads, 2 KV heads, head_dim 64), and a tiny whole model.
LAYER_CONFIG = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
TINY_MODEL_CONFIG = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
QWEN_05B_CONFIG = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
QWEN_15B_CONFIG = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
QWEN_7B_CONFIG = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
)
SHAPES = {"Qwen2.5-0.5B": QWEN_05B_CONFIG, "Qwen2.5-1.5B": QWEN_15B_CONFIG, "Qwen2.5-7B": QWEN_7B_CONFIG}
