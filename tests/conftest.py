"""Shared fixtures: tiny random base models of every supported family (fp32, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 101
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
)

FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
}


def tiny_base_model(family: str = "qwen2", attn: str = "eager", seed: int = 0, **overrides):
    """A tiny random causal LM of `family`, in eval mode."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval()


def perturb_nexus(model, scale: float = 0.5, seed: int = 1) -> None:
    """Give the gates (and inner weights) non-trivial values: a zero gate hides every inner bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gates." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif ".inner." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(1, VOCAB, (2, 11))


def save_tiny_base(folder, family: str = "qwen2") -> None:
    """A tiny base checkpoint with a word-level tokenizer and a chat template, as on the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_base_model(family)
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
