"""The one resume rule of `eval` and the zero-shot suite (nexus_retrofit/evaluation/resume.py), as a
table: what a folder holds -> continued, started fresh, or refused with the line that names why."""

from __future__ import annotations

import json

import pytest

from nexus_retrofit.evaluation.resume import RESULTS_FORMAT, check_previous
from nexus_retrofit.evaluation.samples import ResumeError

SETTINGS = {"model": "m", "seed": 0, "batch_size": 8}
NOT_OUTCOME = frozenset({"batch_size"})
FINGERPRINTS = {"math_500": {"data": "abc", "n_problems": 5}}
MODEL = {"path": "m", "fingerprint": {"sha256": "1" * 64}}


def _results(**changes) -> dict:
    results = {
        "format": RESULTS_FORMAT,
        "settings": dict(SETTINGS),
        "model": {"fingerprint": MODEL["fingerprint"]},
        "tasks": {"math_500": {"fingerprint": FINGERPRINTS["math_500"], "complete": False}},
    }
    for key, value in changes.items():
        results[key] = value
    return results


# (case, what the folder holds: file name -> text, overwrite, None = fresh / "resume" / refusal fragment)
CASES = [
    ("empty folder", {}, False, None),
    ("--overwrite on a run of another configuration", {"results.json": _results(settings={})}, True, None),
    ("the same run", {"results.json": _results()}, False, "resume"),
    (
        "a setting that does not change a score",
        {"results.json": _results(settings={**SETTINGS, "batch_size": 1})},
        False,
        "resume",
    ),
    (
        "another seed",
        {"results.json": _results(settings={**SETTINGS, "seed": 1})},
        False,
        "different settings (seed: 1 -> 0)",
    ),
    (
        "another task fingerprint",
        {"results.json": _results(tasks={"math_500": {"fingerprint": {"data": "old", "n_problems": 5}}})},
        False,
        "math_500.data: 'old' -> 'abc'",
    ),
    (
        "another model",
        {"results.json": _results(model={"fingerprint": {"sha256": "2" * 64}})},
        False,
        "the model at m changed since",
    ),
    ("no model fingerprint", {"results.json": _results(model={})}, False, "without a model fingerprint"),
    ("someone else's results.json", {"results.json": {"tasks": {}}}, False, "not a nexus-retrofit results"),
    (
        "a truncated results.json",
        {"results.json": '{"format": '},
        False,
        "results.json line 1 is not valid JSON",
    ),
    ("samples without results.json", {"samples_math_500.jsonl": ""}, False, "but no results.json"),
]


@pytest.mark.parametrize("case, files, overwrite, expected", CASES, ids=[c[0] for c in CASES])
def test_check_previous(tmp_path, case, files, overwrite, expected):
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / name).write_text(text)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    samples = [tmp_path / "samples_math_500.jsonl"]

    def check():
        return check_previous(tmp_path, SETTINGS, FINGERPRINTS, samples, MODEL, overwrite, NOT_OUTCOME)

    if expected is None:
        assert check() is None
    elif expected == "resume":
        assert check() == json.loads((tmp_path / "results.json").read_text())
    else:
        with pytest.raises(ResumeError) as error:
            check()
        message = str(error.value)
        assert expected in message and "\n" not in message
        assert "--overwrite" in message or "another --output-dir" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # reads only
