"""Shared fixtures: tiny random base models of every supported family (fp32, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
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
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
)

GQA = dict(num_key_value_heads=2)
# Pythia's layout: a quarter of each head rotates (rotary_pct 0.25), biases, LayerNorm, untied head
PYTHIA_ROPE = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
)
# The tests' family matrix: every model_type of nexus_retrofit/families.py, GPT-NeoX in both residual forms.
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, **GQA)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=False, **GQA)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, **GQA)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, **GQA)),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(use_parallel_residual=True, **PYTHIA_ROPE)),
    "gpt_neox_sequential": (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        dict(use_parallel_residual=False, **PYTHIA_ROPE),
    ),
}


def decoder_layers(model):
    """The decoder layers of a (Nexus) causal LM or base model of any family (`.model`, `.gpt_neox`)."""
    return model.base_model.layers


def attention_of(layer):
    """A decoder layer's attention module: `self_attn`, GPT-NeoX's `attention`."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def is_output_projection(name: str) -> bool:
    """A parameter of an attention's output projection (`o_proj`, GPT-NeoX's `dense`)."""
    return ".o_proj." in name or name.split(".")[-2:-1] == ["dense"]


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
