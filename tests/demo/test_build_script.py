"""The rebuild script's pieces, and a 3-step smoke run (never a real pretraining) in a temp folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nexus_retrofit.demo.arithmetic import SINGLE_STEP, TWO_STEP, generate_problems, to_messages
from nexus_retrofit.demo.tokenizer import IM_END, chatml, train_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_model.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def rows():
    return [to_messages(p) for kind in (SINGLE_STEP, TWO_STEP) for p in generate_problems(200, kind, seed=9)]


@pytest.fixture(scope="module")
def tokenizer(rows):
    return train_tokenizer((chatml(r["messages"]) for r in rows), vocab_size=450)


def test_only_the_assistant_turn_is_labelled(build, rows, tokenizer):
    prefix = build.prefix_ids(tokenizer)
    examples = build.tokenize(tokenizer, rows[::40], prefix)
    for row, example in zip(rows[::40], examples):
        assert tokenizer.decode(prefix + example.input_ids) == chatml(row["messages"])
        labelled = [t for t in example.labels if t != build.IGNORE]
        assert tokenizer.decode(labelled) == row["messages"][1]["content"] + IM_END + "\n"
        assert len(example.labels) == len(example.input_ids)


def test_shared_prefix_loss_equals_full_sequences(build, rows, tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    prefix = build.prefix_ids(tokenizer)
    ids, labels = build.collate(build.tokenize(tokenizer, rows[:6], prefix), tokenizer.pad_token_id)

    loss, count = build.summed_loss(model, torch.tensor(prefix), ids, labels)
    (loss / count).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    full_ids = torch.cat([torch.tensor(prefix).expand(len(ids), -1), ids], dim=1)
    full_labels = torch.cat([torch.full((len(ids), len(prefix)), build.IGNORE), labels], dim=1)
    reference = model(input_ids=full_ids, labels=full_labels).loss
    reference.backward()
    torch.testing.assert_close(loss / count, reference)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-4)


def test_learning_rate_schedule(build):
    assert build.lr_at(0, 0.0, 1.0, 10) == pytest.approx(0.1)
    assert build.lr_at(10, 0.0, 1.0, 10) == pytest.approx(1.0)
    assert build.lr_at(500, 1.0, 1.0, 10) == pytest.approx(0.1)


def test_refuses_to_overwrite(build, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(SystemExit, match="--overwrite"):
        build.main(["--out", str(out), "--steps", "1"])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "new").write_text("new")
    with pytest.raises(FileExistsError):
        build.install(tmp, out, overwrite=False)
    build.install(tmp, out, overwrite=True)
    assert (out / "new").read_text() == "new" and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_end_to_end_smoke(build, tmp_path):
    out = tmp_path / "tiny"
    build.main(
        ["--out", str(out), "--steps", "3", "--corpus-size", "200", "--eval-size", "4", "--threads", "1"]
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "TRAINING.md",
    } <= names
    assert "--steps 3" in (out / "TRAINING.md").read_text()


def test_length_grouped_batches_cover_an_epoch(build):
    import random

    lengths = [random.Random(i).randint(50, 110) for i in range(1000)]
    batches = build.length_grouped_batches(lengths, 16, random.Random(0))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) >= 1000 - 16 and all(len(b) == 16 for b in batches)
    assert batches == build.length_grouped_batches(lengths, 16, random.Random(0))


def test_drills_are_solution_steps(build, tokenizer):
    problems = generate_problems(40, TWO_STEP, seed=4)
    drills = build.drill_examples(tokenizer, problems, lines=8, seed=0)
    assert len(drills) == 80 // 8
    lines = [line for d in drills for line in tokenizer.decode(d.input_ids).splitlines()]
    assert sorted(lines) == sorted(f"{s}." for p in problems for s in p.steps)
    assert all(d.labels == d.input_ids for d in drills)
