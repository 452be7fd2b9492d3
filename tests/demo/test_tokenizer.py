"""The demo tokenizer: one token per digit, lossless, ChatML template and special tokens."""

from __future__ import annotations

import pytest

from nexus_retrofit.demo.arithmetic import SINGLE_STEP, TWO_STEP, generate_problems, to_messages
from nexus_retrofit.demo.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, chatml, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rows = [to_messages(p) for kind in (SINGLE_STEP, TWO_STEP) for p in generate_problems(500, kind, seed=5)]
    return train_tokenizer((chatml(r["messages"]) for r in rows), vocab_size=450)


@pytest.fixture(scope="module")
def conversation():
    return to_messages(generate_problems(1, TWO_STEP, seed=6)[0])["messages"]


def test_every_digit_is_its_own_token(tokenizer):
    assert tokenizer.tokenize("12345") == list("12345")
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        assert not any(c.isdigit() for c in text) or len(text) == 1, token
    ids = tokenizer("x 2024 y", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids if tokenizer.decode([i]).isdigit()] == list("2024")


@pytest.mark.parametrize(
    "text",
    [
        "Ana has 7 apples, buys 5 more.\n7 + 5 = 12.",
        "  spaces\tand\ttabs  \n\n",
        "unicode: é, ß, 数学, 🙂",
        "$\\boxed{42}$",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_and_vocab(tokenizer):
    assert 400 <= len(tokenizer) <= 450
    for token in (IM_START, IM_END, ENDOFTEXT):
        assert tokenizer.tokenize(f"a{token}b") == ["a", token, "b"]
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == ENDOFTEXT


def test_chat_template(tokenizer, conversation):
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == chatml(conversation)
    assert rendered.startswith(f"{IM_START}user\n") and rendered.endswith(f"{IM_END}\n")
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == chatml(conversation[:1], add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n") and rendered.startswith(prompt)
    assert tokenizer.decode(tokenizer(rendered, add_special_tokens=False)["input_ids"]) == rendered


def test_save_and_reload(tokenizer, conversation, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    text = loaded.apply_chat_template(conversation, tokenize=False)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
