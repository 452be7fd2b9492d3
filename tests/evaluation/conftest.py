"""Fixtures for the eval harness: a tiny chat model (base and Nexus) and local data in the Hub schemas.

The tokenizer is a byte-level BPE trained here in milliseconds with a ChatML template; the model is
a random 2-layer Qwen2. Nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MATH_ROWS = [
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{3}$?",
        "solution": "We get $\\boxed{\\frac{5}{6}}$.",
        "answer": "\\frac{5}{6}",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
    {
        "problem": "Solve $2x = 6$.",
        "solution": "So $x = \\boxed{3}$.",
        "answer": "3",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/2.json",
    },
    {
        "problem": "Find the interval where $x^2 < 4$.",
        "solution": "$\\boxed{(-2, 2)}$",
        "answer": "(-2,2)",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "test/algebra/3.json",
    },
    {
        "problem": "What is $7 \\cdot 6$?",
        "solution": "$\\boxed{42}$",
        "answer": "42",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/4.json",
    },
]
AIME_ROWS = [
    {
        "id": 60,
        "problem": "Find the remainder when $2^{10}$ is divided by 1000.",
        "solution": "...",
        "answer": "24",
        "url": "",
        "year": "2024",
    },
    {"id": 61, "problem": "Compute $17 + 25$.", "solution": "...", "answer": "42", "url": "", "year": "2024"},
    {
        "id": 62,
        "problem": "Compute $100 - 1$.",
        "solution": "...",
        "answer": "099",
        "url": "",
        "year": "2024",
    },
]
GPQA_ROWS = [
    {
        "Record ID": f"rec{i}",
        "Question": f"Which particle is number {i}?",
        "Correct Answer": f"right {i}",
        "Incorrect Answer 1": f"wrong a{i}",
        "Incorrect Answer 2": f"wrong b{i}",
        "Incorrect Answer 3": f"wrong c{i}",
        "Subdomain": "Physics",
    }
    for i in range(4)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread than fighting for two busy cores; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "Solve the following math problem efficiently and clearly.",
        "Answer the following multiple choice question. Answer: A B C D",
        "Therefore, the final answer is: $\\boxed{42}$. I hope it is correct",
        "What is 1 + 2? 3 4 5 6 7 8 9 0 user assistant system",
    ]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def _tiny_qwen2(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,  # head_dim 32: vLLM's CPU attention takes no smaller head size
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny Qwen2 chat model saved with its tokenizer (fp32 safetensors)."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    _tiny_qwen2(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def nexus_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The same tiny model converted to Nexus (order 2, QK, separate inner) with non-zero gates."""
    import torch

    import nexus_retrofit

    model = nexus_retrofit.convert(_tiny_qwen2(tiny_tokenizer), nexus_retrofit.NexusConfig())
    with torch.no_grad():  # a zero gate would make the Nexus path invisible
        for name, p in model.named_parameters():
            if ".gates." in name:
                p.fill_(0.5)
    path = tmp_path_factory.mktemp("tiny_nexus")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Local data for the three built-in tasks in the Hub datasets' own columns (GPQA as parquet)."""
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "math_500.jsonl", MATH_ROWS)
    write_jsonl(d / "aime24.jsonl", AIME_ROWS)
    write_parquet(d / "gpqa_diamond.parquet", GPQA_ROWS)
    return d


@pytest.fixture(scope="session")
def cli():
    """Invoke `nexus-retrofit ARGS...` in-process; returns the click Result."""
    from typer.testing import CliRunner

    from nexus_retrofit.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


class ScriptedBackend:
    """A stand-in backend whose completions are a function of (prompt, seed, sample): exercises the
    runner, grading and resume logic without a model. `answer(prompt, seed, j)` returns the text."""

    name = "scripted"

    def __init__(self, tokenizer, answer, fail_on_call: int | None = None):
        self.tokenizer = tokenizer
        self.answer = answer
        self.calls = 0
        self.generated: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def generate(self, prompts, sampling, seeds):
        from nexus_retrofit.evaluation.backends import Generation

        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        out = []
        for prompt, seed in zip(prompts, seeds):
            texts = [self.answer(prompt, seed, j) for j in range(sampling.n)]
            out.append(Generation(texts, [len(t) for t in texts]))
        self.generated.append(list(prompts))
        return out

    def close(self):
        pass


@pytest.fixture
def scripted():
    """The ScriptedBackend class (see above)."""
    return ScriptedBackend
