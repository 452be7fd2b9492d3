"""Graders: extract an answer from a completion and compare it with the gold.

Math follows open-r1's lighteval setup on math-verify (pinned in pyproject.toml): the prediction is
parsed with expression and LaTeX extraction, a `\\boxed{}` answer taking priority over everything else
(the last box wins), and compared with the gold through sympy at 5 decimal places. Multiple choice
extracts the letter with anchored patterns only ("Answer: C", "\\boxed{C}", "the answer is (C)", a
line holding just the letter): a bare "A" in the text is a word, not an answer.

An extraction failure is graded wrong and reported separately (`Verdict.extracted is None`), so a
model that stops mid-thought is told apart from one that answers wrongly.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Protocol

from .answers import LETTERS


@dataclasses.dataclass(frozen=True)
class Verdict:
    extracted: str | None  # None: nothing could be extracted (counted wrong, reported apart)
    correct: bool


class Grader(Protocol):
    name: str

    def describe(self) -> dict:
        """Settings and versions that decide the verdicts (recorded in results.json)."""

    def grade(self, completion: str, gold: str, num_choices: int = 4) -> Verdict: ...


# -------------------------------------------------------------------------------------------- math
class MathGrader:
    """math-verify grading, configured as open-r1's lighteval MATH-500/AIME metrics."""

    name = "math"
    float_rounding = 5  # lighteval's precision=5

    def describe(self) -> dict:
        from importlib.metadata import version

        return {
            "grader": self.name,
            "math_verify": version("math-verify"),
            "gold_extraction": "LatexExtractionConfig() on $\\boxed{gold}$, ExprExtractionConfig()",
            "pred_extraction": "ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)",
            "float_rounding": self.float_rounding,
        }

    @staticmethod
    @lru_cache(maxsize=1)
    def _configs():
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        gold = (LatexExtractionConfig(), ExprExtractionConfig())
        pred = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
        return gold, pred

    @lru_cache(maxsize=4096)  # noqa: B019 - golds repeat n times per problem; the grader lives for the run
    def _gold(self, gold: str) -> list:
        from math_verify import parse

        gold_cfg, _ = self._configs()
        # A gold answer is bare LaTeX ("\frac{14}{3}", "(3, \frac{\pi}{2})"); boxing it lets the LaTeX
        # extractor take all of it rather than guess where an unwrapped expression ends.
        wrapped = gold if "\\boxed" in gold else f"$\\boxed{{{gold}}}$"
        parsed = parse(wrapped, gold_cfg)
        return parsed if parsed else parse(gold, gold_cfg)

    def grade(self, completion: str, gold: str, num_choices: int = 4) -> Verdict:
        from math_verify import parse, verify

        _, pred_cfg = self._configs()
        gold_parsed = self._gold(str(gold))
        if not gold_parsed:
            raise ValueError(f"math-verify could not parse the gold answer {gold!r}")
        pred = parse(completion, pred_cfg)
        if not pred:
            return Verdict(None, False)
        extracted = str(pred[1]) if len(pred) > 1 else str(pred[0])
        return Verdict(extracted, bool(verify(gold_parsed, pred, float_rounding=self.float_rounding)))


# --------------------------------------------------------------------------------- multiple choice
_MARKUP = r"(?:\*\*|\*|\$|\\\(|\\\[|\(|\[|\{|\\boxed\s*\{|\\text(?:bf)?\s*\{|\\mathrm\s*\{|\s)*"
_AFTER = r"(?![A-Za-z0-9])"


@lru_cache(maxsize=32)
def _letter_patterns(num_choices: int) -> list[re.Pattern[str]]:
    """Patterns from most to least specific; in each tier the last match in the text wins."""
    letter = f"(?P<letter>[{LETTERS[:num_choices]}])"
    return [
        # "Answer: C", "**Answer:** (C)", "ANSWER: $C$", "final answer: \boxed{C}"
        re.compile(rf"(?i:answer)\s*\**\s*[:：]\s*\**{_MARKUP}{letter}{_AFTER}"),
        # "\boxed{C}", "\boxed{\text{(C)}}"
        re.compile(rf"\\boxed\s*\{{\s*(?:\\text(?:bf)?\s*\{{)?\s*\(?{letter}\)?\s*\}}"),
        # "the answer is (C)", "correct option is C", "answer would be: C"
        re.compile(
            rf"(?i:(?:answer|option|choice))\s+(?i:is|would be|should be|must be)?\s*[:：]?\s*{_MARKUP}{letter}{_AFTER}"
        ),
        # a line that is just the letter: "C", "(C)", "**C.**"
        re.compile(rf"^[ \t]*(?:\*\*)?[(\[]?{letter}[)\].]?(?:\*\*)?[ \t]*$", re.MULTILINE),
    ]


def extract_letter(completion: str, num_choices: int = 4) -> str | None:
    """The choice letter a completion commits to, or None when it commits to none."""
    for pattern in _letter_patterns(num_choices):
        matches = list(pattern.finditer(completion))
        if matches:
            return matches[-1].group("letter")
    return None


class MultipleChoiceGrader:
    name = "multiple_choice"
    version = "1"

    def describe(self) -> dict:
        return {
            "grader": self.name,
            "letter_extraction": f"nexus-retrofit v{self.version} (anchored, last match)",
        }

    def grade(self, completion: str, gold: str, num_choices: int = 4) -> Verdict:
        gold = str(gold).strip().strip("()").upper()
        if len(gold) != 1 or gold not in LETTERS:
            raise ValueError(f"a multiple-choice gold must be a single letter, got {gold!r}")
        letter = extract_letter(completion, max(num_choices, LETTERS.index(gold) + 1))
        return Verdict(letter, letter == gold)


# ---------------------------------------------------------------------------------------- registry
_GRADERS: dict[str, Grader] = {"math": MathGrader(), "multiple_choice": MultipleChoiceGrader()}


def register_grader(grader: Grader, *, overwrite: bool = False) -> Grader:
    """Add a custom grader (any object with `name`, `describe()` and `grade()`) for Task.grader."""
    if grader.name in _GRADERS and not overwrite:
        raise ValueError(f"a grader named {grader.name!r} is already registered; pass overwrite=True")
    _GRADERS[grader.name] = grader
    return grader


def get_grader(name: str) -> Grader:
    try:
        return _GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known graders: {', '.join(sorted(_GRADERS))}") from None
