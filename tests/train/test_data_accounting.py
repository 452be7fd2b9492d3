"""Data accounting: rows read, dropped (and why) and kept, as TRL's SFTTrainer will see them.

Each table row is a small dataset; the check runs TRL's own tokenization on it and counts the rows
left without a completion token to learn from. Also: conversational rows with a tokenizer that has
no chat template, and local data files that are not UTF-8.
"""

from __future__ import annotations

import json

import pytest

from nexus_retrofit.train import RecipeError, parse_recipe
from nexus_retrofit.train.data import (
    EMPTY,
    TRUNCATED,
    WRONG_ROLES,
    account_rows,
    load_datasets,
)
from tests.train.conftest import IM_END, IM_START, build_tokenizer, conversations

LONG = "q " * 120  # about 120 tokens: past max_length 64 on its own


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in row["messages"])
        for row in conversations()
    ]
    return build_tokenizer(texts * 4)


def chat(user: str = "What is 1 plus 2?", assistant: str | None = "1 plus 2 is 3.") -> dict:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def pair(prompt: str = "What is 1 plus 2?", completion: str = " 3.") -> dict:
    return {"prompt": prompt, "completion": completion}


def chat_pair(prompt: str = "What is 1 plus 2?", completion: str = "3.", role: str = "assistant") -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": role, "content": completion}],
    }


def good_like(row: dict) -> dict:
    """A clean row in the format of `row`."""
    if "messages" in row:
        return chat()
    return chat_pair() if isinstance(row["prompt"], list) else pair()


def write(tmp_path, rows: list[dict], name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path, rows: list[dict], **settings):
    """(train dataset, parsed recipe) for `rows` in a local jsonl, max_length 64 unless given."""
    path = write(tmp_path, rows)
    parsed = parse_recipe(
        {
            "model_name_or_path": "unused",
            "dataset_name": str(path),
            "output_dir": str(tmp_path / "run"),
            "max_length": 64,
            "use_cpu": True,
            "report_to": "none",
            **settings,
        }
    )
    train, _, _ = load_datasets(parsed.script, parsed.training)
    return train, parsed


# rows (4 good + the bad ones at the end), recipe settings, reason, fix named in the error
REFUSED = [
    pytest.param(
        [chat(user=LONG)], {}, TRUNCATED, "raise --max_length to", id="messages-completion-truncated"
    ),
    pytest.param([chat(assistant=None)], {}, WRONG_ROLES, "fix or remove", id="messages-last-turn-user"),
    pytest.param(
        [{"messages": [*chat()["messages"], {"role": "user", "content": "thanks"}]}],
        {},
        WRONG_ROLES,
        "fix or remove",
        id="messages-ends-on-a-user-turn",
    ),
    pytest.param([chat(assistant="  ")], {}, EMPTY, "fix or remove", id="messages-empty-assistant"),
    pytest.param(
        [pair(prompt=LONG)], {}, TRUNCATED, "raise --max_length to", id="prompt-completion-truncated"
    ),
    pytest.param([pair(completion="")], {}, EMPTY, "fix or remove", id="prompt-completion-empty"),
    pytest.param(
        [pair(prompt=LONG)],
        {"completion_only_loss": False},
        TRUNCATED,
        "raise --max_length to",
        id="prompt-completion-truncated-full-loss",
    ),
    pytest.param(
        [chat_pair(prompt=LONG)],
        {},
        TRUNCATED,
        "raise --max_length to",
        id="chat-prompt-completion-truncated",
    ),
    pytest.param(
        [chat_pair(role="user")], {}, WRONG_ROLES, "fix or remove", id="chat-completion-by-the-user"
    ),
    pytest.param([chat_pair(completion="")], {}, EMPTY, "fix or remove", id="chat-completion-empty"),
    pytest.param(
        [chat(user=LONG)], {"packing": True}, TRUNCATED, "raise --max_length to", id="packing-bfd-truncated"
    ),
]


@pytest.mark.parametrize("bad,settings,reason,fix", REFUSED)
def test_rows_without_a_completion_are_refused(tokenizer, tmp_path, bad, settings, reason, fix):
    train, parsed = load(tmp_path, [good_like(bad[0])] * 4 + bad, **settings)
    with pytest.raises(RecipeError) as e:
        account_rows(train, tokenizer, parsed.script, parsed.training)
    message = str(e.value)
    assert "\n" not in message
    assert f"1 of 5 rows of {tmp_path / 'data.jsonl'}" in message and f"1 {reason}" in message
    assert "line 5" in message and fix in message  # the row's line in the file, and what to do

    report = account_rows(train, tokenizer, parsed.script, parsed.training, max_dropped_share=0.2)
    assert (report.rows, report.kept, report.dropped, report.dropped_rows) == (5, 4, {reason: 1}, (4,))
    assert len(report.without_dropped(train)) == 4
    if reason == TRUNCATED:  # the suggested max_length keeps the row whole
        needed = report.needed_max_length
        again = parse_recipe({**parsed.values, "max_length": needed})
        assert account_rows(train, tokenizer, again.script, again.training).lost == 0


KEPT = [
    pytest.param([chat()] * 3, {}, id="messages"),
    pytest.param([pair()] * 3, {}, id="prompt-completion"),
    pytest.param([chat_pair()] * 3, {}, id="chat-prompt-completion"),
    pytest.param([chat(assistant=LONG)] * 3, {}, id="messages-long-completion-cut-not-lost"),
    pytest.param([chat(user=LONG)] * 3, {"max_length": None}, id="no-max-length"),
    pytest.param(
        [chat(user=LONG)] * 3, {"packing": True, "packing_strategy": "bfd_split"}, id="packing-split"
    ),
    pytest.param([{"text": "plain text"}] * 3, {}, id="text-rows-not-counted"),
]


@pytest.mark.parametrize("rows,settings", KEPT)
def test_clean_rows_are_kept_and_counted(tokenizer, tmp_path, rows, settings):
    train, parsed = load(tmp_path, rows, **settings)
    report = account_rows(train, tokenizer, parsed.script, parsed.training)
    assert (report.rows, report.kept, report.lost, report.dropped) == (3, 3, 0, {})
    assert report.to_dict()["kept"] == 3 and "3 rows read, 3 kept" in report.summary()
    assert report.without_dropped(train) is train


SHARES = [
    pytest.param(0.0, True, id="default-any-loss-refused"),
    pytest.param(0.1, True, id="share-below-the-loss"),
    pytest.param(0.125, False, id="share-equal-to-the-loss"),
    pytest.param(0.5, False, id="share-above-the-loss"),
]


@pytest.mark.parametrize("share,refused", SHARES)
def test_the_recipe_sets_the_share_that_may_be_lost(tokenizer, tmp_path, share, refused):
    train, parsed = load(tmp_path, [chat()] * 7 + [chat(assistant=None)], dataset_max_dropped_share=share)
    if refused:
        with pytest.raises(RecipeError, match=r"1 of 8 rows .*--dataset_max_dropped_share 0.125"):
            account_rows(train, tokenizer, parsed.script, parsed.training)
    else:
        assert account_rows(train, tokenizer, parsed.script, parsed.training).dropped == {WRONG_ROLES: 1}


def test_trl_drops_exactly_the_rows_counted(tokenizer, tiny_model_dir, tmp_path):
    """The count is TRL's: SFTTrainer keeps the rows the report keeps (prompt-completion, truncated)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    train, parsed = load(tmp_path, [pair()] * 5 + [pair(prompt=LONG)] * 2, dataset_max_dropped_share=0.5)
    report = account_rows(train, tokenizer, parsed.script, parsed.training)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=parsed.training,
        train_dataset=train,
        processing_class=tokenizer,
    )
    assert report.kept == len(trainer.train_dataset) == 5 and report.dropped == {TRUNCATED: 2}


NO_TEMPLATE = [
    pytest.param([chat()], id="messages"),
    pytest.param([chat_pair()], id="chat-prompt-completion"),
]


@pytest.mark.parametrize("rows", NO_TEMPLATE)
def test_conversational_rows_need_a_chat_template(tokenizer, tmp_path, rows):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    train, parsed = load(tmp_path, rows)
    with pytest.raises(RecipeError, match=r"conversational rows .* has no chat template: set chat_template"):
        account_rows(train, plain, parsed.script, parsed.training)


NOT_UTF8 = [
    pytest.param("data.jsonl", False, id="jsonl-file"),
    pytest.param("data.jsonl", True, id="jsonl-in-a-folder"),
    pytest.param("data.csv", False, id="csv-file"),
]


@pytest.mark.parametrize("name,in_folder", NOT_UTF8)
def test_a_data_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, in_folder):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / name
    if name.endswith(".csv"):
        path.write_bytes(b"text\nfine\nnaive caf\xe9\n")
    else:
        path.write_bytes(
            (json.dumps(chat()) + "\n").encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
        )
    parsed = parse_recipe(
        {
            "model_name_or_path": "unused",
            "dataset_name": str(folder if in_folder else path),
            "output_dir": "x",
            "use_cpu": True,
        }
    )
    line = 3 if name.endswith(".csv") else 2
    with pytest.raises(RecipeError, match=rf"{name} is not UTF-8 text: line {line}, .*offset \d+.*re-encode"):
        load_datasets(parsed.script, parsed.training)
