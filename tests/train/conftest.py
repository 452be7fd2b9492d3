"""Fixtures for the training tests: a tiny random Qwen2 with an offline BPE tokenizer, and chat data.

Everything is built in tmp folders in well under a second; runs use fp32 on CPU, a few steps each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(n: int = 32) -> list[dict]:
    """Short, regular question/answer pairs: a tiny model's loss falls fast on them."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, (3 * i) % 5 + 2
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            }
        )
    return rows


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: faster for a model this small, and fair to a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (hidden 64, 2 layers, 4 heads, 2 KV heads) and its tokenizer, saved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    texts = [
        "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in row["messages"])
        for row in conversations()
    ]
    tokenizer = build_tokenizer(texts * 4)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in conversations()), encoding="utf-8")
    return path


NEXUS = {"order": 2, "projections": "qk", "inner": "separate", "gate": "zero", "inner_init": "random"}


def make_recipe(model_dir: Path, data: Path, output_dir: Path, **changes) -> dict:
    """A baseline recipe for a few fast steps on CPU; pass nexus={...} for the Nexus run."""
    return {
        "model_name_or_path": str(model_dir),
        "dtype": "float32",
        "dataset_name": str(data),
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 3.0e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "max_length": 64,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "seed": 0,
        **changes,
    }


@pytest.fixture
def recipe(tiny_model_dir, chat_jsonl, tmp_path) -> dict:
    return make_recipe(tiny_model_dir, chat_jsonl, tmp_path / "run")
