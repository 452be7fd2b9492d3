"""The shipped tiny model: it loads as a plain Qwen2, chats in ChatML and is the trained checkpoint."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

from nexus_retrofit.demo import eval_data_path, sft_data_path, tiny_model_path
from nexus_retrofit.demo.arithmetic import read_jsonl
from nexus_retrofit.demo.scoring import greedy_accuracy, is_correct
from nexus_retrofit.demo.tokenizer import ENDOFTEXT, IM_END, IM_START


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(tiny_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_path())


def test_asset_paths_live_in_the_package():
    import nexus_retrofit

    package = tiny_model_path().parents[1]
    assert package == type(tiny_model_path())(nexus_retrofit.__file__).parent
    for path in (tiny_model_path(), sft_data_path(), eval_data_path()):
        assert path.exists() and package in path.parents
    names = {p.name for p in tiny_model_path().iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "TRAINING.md",
    } <= names
    assert (tiny_model_path() / "model.safetensors").stat().st_size < 10_000_000


def test_model_is_a_small_qwen2(model, tokenizer):
    assert isinstance(model, Qwen2ForCausalLM)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        192, 4, 4, 2, 48,
    )  # fmt: skip
    assert (
        c.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    assert c.vocab_size == len(tokenizer)
    assert model.dtype == torch.bfloat16  # saved in bf16, loaded as saved
    generation = GenerationConfig.from_pretrained(tiny_model_path())
    assert generation.eos_token_id == c.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert generation.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(ENDOFTEXT)


def test_tokenizer_applies_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == f"{IM_START}user\nWhat is 2 + 3?{IM_END}\n{IM_START}assistant\n"
    assert tokenizer.tokenize("2 + 13") == ["2", "Ġ+", "Ġ", "1", "3"]
    assert tokenizer.eos_token == IM_END


def test_training_record():
    record = (tiny_model_path() / "TRAINING.md").read_text()
    for needle in ("scripts/build_tiny_model.py", "seed", "final training loss", "single-step", "two-step"):
        assert needle in record


def test_shipped_weights_are_trained(model, tokenizer):
    """Greedy on 50 held-out single-step problems: a random or untrained model scores ~0."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [r for r in read_jsonl(eval_data_path()) if r["level"] == 1][:50]
    start = time.perf_counter()
    accuracy = greedy_accuracy(model, tokenizer, rows, batch_size=50)
    assert accuracy > 0.10, accuracy
    assert time.perf_counter() - start < 60


def test_is_correct():
    assert is_correct("7 + 5 = 12.\nTherefore, the final answer is: $\\boxed{12}$.", "12")
    assert not is_correct("$\\boxed{12}$ then $\\boxed{13}$", "12")
    assert not is_correct("$\\boxed{x}$", "12") and not is_correct("no answer", "12")
