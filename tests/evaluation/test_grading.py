"""Graders on real-world answer forms: what models write and what the datasets' golds look like."""

from __future__ import annotations

import pytest

from nexus_retrofit.evaluation.answers import last_boxed
from nexus_retrofit.evaluation.grading import extract_letter, get_grader

FINAL = "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct"

# (gold as in the dataset, completion, expected correct, extraction expected to succeed)
MATH_CASES = [
    pytest.param("\\frac{14}{3}", FINAL.format("\\frac{14}{3}"), True, True, id="fraction"),
    pytest.param("\\frac{14}{3}", FINAL.format("\\dfrac{14}{3}"), True, True, id="dfrac"),
    pytest.param("\\frac{14}{3}", "So the answer is 14/3", True, True, id="slash-fraction-no-box"),
    # Pinned quirk of math-verify 0.9.0 (lighteval scores it the same way): "14/3." reads as 14/3.0.
    pytest.param("\\frac{14}{3}", "So the answer is 14/3.", False, True, id="pinned-quirk-trailing-period"),
    pytest.param("\\frac{14}{3}", FINAL.format("4.6667"), False, True, id="rounded-decimal-is-wrong"),
    pytest.param("0.5", FINAL.format("\\frac{1}{2}"), True, True, id="decimal-vs-fraction"),
    pytest.param(
        "\\frac{\\sqrt{3}}{2}", FINAL.format("\\frac{\\sqrt{3}}{2}"), True, True, id="nested-braces"
    ),
    pytest.param("2", "$\\boxed{\\frac{\\sqrt{\\frac{16}{4}}}{1}}$", True, True, id="deeply-nested-braces"),
    pytest.param(
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        FINAL.format("(3, \\frac{\\pi}{2})"),
        True,
        True,
        id="tuple-left-right",
    ),
    pytest.param("[-2,7]", FINAL.format("[-2, 7]"), True, True, id="closed-interval"),
    pytest.param("[-2,7]", FINAL.format("(-2, 7)"), False, True, id="open-vs-closed-interval"),
    pytest.param(
        "(-\\infty, 2) \\cup (3, \\infty)",
        FINAL.format("(-\\infty,2)\\cup(3,\\infty)"),
        True,
        True,
        id="union",
    ),
    pytest.param("10", FINAL.format("10\\text{ cm}"), True, True, id="units-text"),
    pytest.param("10", FINAL.format("10 \\mbox{ inches}"), True, True, id="units-mbox"),
    pytest.param("90^\\circ", FINAL.format("90"), True, True, id="gold-degrees"),
    pytest.param("90", FINAL.format("90^\\circ"), True, True, id="pred-degrees"),
    pytest.param("3", FINAL.format("x = 3"), True, True, id="equation-x-equals"),
    pytest.param("3", "We find that $x = 3$.", True, True, id="equation-no-box"),
    pytest.param(
        "\\frac{1}{2}",
        "First $\\boxed{3}$, no wait: $\\boxed{\\frac{1}{2}}$",
        True,
        True,
        id="multiple-boxes-last-wins",
    ),
    pytest.param(
        "3",
        "First $\\boxed{3}$, no wait: $\\boxed{\\frac{1}{2}}$",
        False,
        True,
        id="multiple-boxes-first-ignored",
    ),
    pytest.param("204", "The answer is 204.", True, True, id="aime-no-box"),
    pytest.param("099", FINAL.format("99"), True, True, id="aime-leading-zero"),
    pytest.param("1,2", FINAL.format("1, 2"), True, True, id="list-of-values"),
    pytest.param("\\$18.90", FINAL.format("18.90"), True, True, id="dollars"),
    pytest.param("5\\%", FINAL.format("5"), True, True, id="percent-gold"),
    pytest.param("\\text{(C)}", FINAL.format("C"), True, True, id="text-letter"),
    pytest.param("42", "I am not sure how to solve this.", False, False, id="no-answer"),
    pytest.param("42", "", False, False, id="empty"),
]


@pytest.mark.parametrize("gold, completion, correct, extracted", MATH_CASES)
def test_math_grader(gold, completion, correct, extracted):
    verdict = get_grader("math").grade(completion, gold)
    assert verdict.correct is correct
    assert (verdict.extracted is not None) is extracted


def test_math_grader_reports_the_extracted_answer():
    verdict = get_grader("math").grade(FINAL.format("\\dfrac{14}{3}"), "\\frac{14}{3}")
    assert verdict.extracted == "\\frac{14}{3}"


def test_unparsable_gold_is_an_error_not_a_wrong_answer():
    with pytest.raises(ValueError, match="gold"):
        get_grader("math").grade("\\boxed{3}", "")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{3}", "3"),
        ("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}", "x^{2}"),
        ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
        ("\\fbox{7}", "7"),
        ("no box", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


LETTER_CASES = [
    pytest.param("...\nAnswer: C", "C", id="answer-colon"),
    pytest.param("**Answer:** (B)", "B", id="markdown-parenthesised"),
    pytest.param("Answer: $D$", "D", id="dollar"),
    pytest.param("ANSWER: B", "B", id="upper-case-anchor"),
    pytest.param("Final Answer: $\\boxed{B}$", "B", id="boxed-after-anchor"),
    pytest.param("$\\boxed{\\text{(C)}}$", "C", id="boxed-text"),
    pytest.param("So the answer is (A).", "A", id="answer-is"),
    pytest.param("The correct option is B.", "B", id="option-is"),
    pytest.param("The answer is: **C**", "C", id="answer-is-bold"),
    pytest.param("Answer: A) 5 m", "A", id="letter-then-choice-text"),
    pytest.param("I think A is wrong.\nAnswer: D", "D", id="stray-letter-before-anchor"),
    pytest.param("Answer: B\nWait, let me recheck.\nAnswer: C", "C", id="last-anchor-wins"),
    pytest.param("Reasoning...\n\n(C)\n", "C", id="letter-alone-on-line"),
    pytest.param("A bird flies over a river.", None, id="article-a-is-not-an-answer"),
    pytest.param("Answer: Apple", None, id="word-after-anchor"),
    pytest.param("Answer: E", None, id="out-of-range-letter"),
    pytest.param("", None, id="empty"),
]


@pytest.mark.parametrize("text, expected", LETTER_CASES)
def test_extract_letter(text, expected):
    assert extract_letter(text, 4) == expected


def test_multiple_choice_grader_counts_failures_as_wrong():
    grader = get_grader("multiple_choice")
    assert grader.grade("Answer: B", "B").correct
    assert not grader.grade("Answer: A", "B").correct
    failed = grader.grade("I cannot decide.", "B")
    assert failed.extracted is None and not failed.correct
    with pytest.raises(ValueError, match="single letter"):
        grader.grade("Answer: B", "right 3")


def test_unknown_grader_lists_known_ones():
    with pytest.raises(ValueError, match="math.*multiple_choice"):
        get_grader("nope")
