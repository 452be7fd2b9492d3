"""paired_comparison: the demo's answer to "does the Nexus model differ, and is it better"."""

from __future__ import annotations

import pytest

from nexus_retrofit.demo.scoring import paired_comparison


def _records(correct: list[int], completions: list[str] | None = None) -> list[dict]:
    completions = completions or [str(c) for c in correct]
    return [{"correct": bool(c), "completion": t} for c, t in zip(correct, completions)]


CASES = [
    # (name, base correct, other correct, other completions or None, differ, verdict)
    ("identical", [1, 0, 1, 0], [1, 0, 1, 0], None, 0, "same"),
    ("same correctness, other text", [1, 0], [1, 0], ["1 ", "0 "], 2, "same"),
    ("all fixed", [0] * 20, [1] * 20, None, 20, "better"),
    ("all broken", [1] * 20, [0] * 20, None, 20, "worse"),
    ("one each way", [1, 0, 1, 1], [0, 1, 1, 1], None, 2, "no significant difference"),
]


@pytest.mark.parametrize("name,base,other,texts,differ,verdict", CASES, ids=[c[0] for c in CASES])
def test_paired_comparison(name, base, other, texts, differ, verdict):
    result = paired_comparison(_records(base), _records(other, texts))
    assert result["n"] == len(base)
    assert result["differ"] == differ
    assert result["verdict"] == verdict
    assert result["difference"] == pytest.approx((sum(other) - sum(base)) / len(base))


def test_paired_stderr_is_the_spread_of_per_problem_differences():
    # differences +1, 0, 0, -1: mean 0, sample variance 2/3, stderr sqrt(2/3 / 4)
    result = paired_comparison(_records([0, 1, 0, 1]), _records([1, 1, 0, 0]))
    assert result["difference_stderr"] == pytest.approx((2 / 3 / 4) ** 0.5)


@pytest.mark.parametrize("base,other", [([], []), ([1], [1, 0])])
def test_paired_comparison_needs_matching_problems(base, other):
    with pytest.raises(ValueError, match="same non-empty problems"):
        paired_comparison(_records(base), _records(other))
