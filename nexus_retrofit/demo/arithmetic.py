"""Seeded generator of arithmetic word problems for the embedded demo model.

The Hub is not reachable on the development machines, so the demo's model and data are generated
here: single-step problems (one operation) and two-step problems (two chained operations), with
small operands and integer answers. Each problem renders as a MATH-500 row (`problem`, `solution`,
`answer`, ...) for the eval harness and as a conversational `messages` row for TRL SFT; both use the
lighteval math prompt, so the model sees in training exactly the prompt it is evaluated with.

Splits are disjoint twice over: each comes from its own seed, and every later split excludes the
problem texts of the earlier ones (eval first, then SFT, then the pretraining corpus).

    python -m nexus_retrofit.demo.arithmetic --out nexus_retrofit/assets/data
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.answers import MATH_PROMPT as EVAL_MATH_PROMPT

# The eval harness's math prompt (open-r1's pinned lighteval prompt), with the problem appended after it.
MATH_PROMPT = EVAL_MATH_PROMPT.replace("{problem}", "")
FINAL_LINE = "Therefore, the final answer is: $\\boxed{{{answer}}}$. I hope it is correct"

SINGLE_STEP = "single_step"
TWO_STEP = "two_step"
KINDS = (SINGLE_STEP, TWO_STEP)
LEVELS = {SINGLE_STEP: 1, TWO_STEP: 2}

# Fixed seeds of the shipped splits; the pretraining corpus uses the build script's --seed and excludes
# every eval and SFT problem by text.
EVAL_SEED = 1_000_001
SFT_SEED = 1_000_002
EVAL_SIZE = 500  # per kind: docs/DESIGN.md §9, 200 per type gave swings of +-10 points
SFT_SIZE = 3_000  # two-step only: ~300 steps at batch 16 is about 1.6 epochs

NAMES = (
    "Ana", "Ben", "Carla", "Dev", "Eva", "Finn", "Gita", "Hugo", "Iris", "Jon", "Kai", "Lena",
    "Mia", "Noah", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vera", "Yuki", "Zoe", "Leo",
)  # fmt: skip
ITEMS = (
    "apples", "books", "cards", "coins", "cookies", "marbles", "pencils", "stamps", "stickers",
    "shells", "balloons", "eggs", "flowers", "toys", "candies", "buttons",
)  # fmt: skip
GAIN = ("buys {b} more", "finds {b} more", "gets {b} more", "is given {b} more")
LOSS = ("gives away {b}", "loses {b}", "sells {b}", "gives {b} to a friend")
CONTAINERS = ("bags", "boxes", "jars", "packs")


@dataclass(frozen=True)
class Step:
    """One operation `left op right = result` of a solution."""

    left: int
    op: str  # "+", "-", "*", "/"
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """A word problem with its worked steps; `answer` is the last step's result."""

    text: str
    steps: tuple[Step, ...]
    kind: str
    unique_id: str

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def solution(self) -> str:
        """Short on purpose: the demo model is tiny. One line per step, then lighteval's final line."""
        lines = [f"{step}." for step in self.steps]
        return "\n".join([*lines, FINAL_LINE.format(answer=self.answer)])


def _apply(left: int, op: str, right: int) -> Step:
    if op == "+":
        return Step(left, op, right, left + right)
    if op == "-":
        return Step(left, op, right, left - right)
    if op == "*":
        return Step(left, op, right, left * right)
    if op == "/":
        assert left % right == 0, (left, right)
        return Step(left, op, right, left // right)
    raise ValueError(f"unknown operation {op!r}")


# --- templates: each draws operands from rng and returns (text, steps) ---------------------------


def _change(rng: random.Random, count: int, limit: int = 20) -> tuple[str, int, str]:
    """A gain or a loss applied to `count`: (phrase, operand, op); a loss never goes below zero."""
    if count >= 2 and rng.random() < 0.5:
        b = rng.randint(1, min(count - 1, limit))
        return rng.choice(LOSS).format(b=b), b, "-"
    b = rng.randint(1, limit)
    return rng.choice(GAIN).format(b=b), b, "+"


def _single_change(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    a = rng.randint(2, 20)
    phrase, b, op = _change(rng, a)
    text = f"{name} has {a} {item} and {phrase}. How many {item} does {name} have now?"
    return text, (_apply(a, op, b),)


def _single_groups(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    a, b, box = rng.randint(2, 9), rng.randint(2, 9), rng.choice(CONTAINERS)
    text = f"{name} buys {a} {box} with {b} {item} in each. How many {item} does {name} buy?"
    return text, (_apply(a, "*", b),)


def _single_times(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    other = rng.choice([n for n in NAMES if n != name])
    a, k = rng.randint(2, 9), rng.randint(2, 9)
    text = f"{name} has {a} {item}. {other} has {k} times as many {item} as {name}. How many {item} does {other} have?"
    return text, (_apply(a, "*", k),)


def _single_share(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    k, q = rng.randint(2, 9), rng.randint(1, 10)
    text = f"{name} shares {k * q} {item} equally among {k} friends. How many {item} does each friend get?"
    return text, (_apply(k * q, "/", k),)


def _two_changes(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    a = rng.randint(2, 20)
    phrase1, b, op1 = _change(rng, a)
    first = _apply(a, op1, b)
    phrase2, c, op2 = _change(rng, first.result)
    text = f"{name} has {a} {item}, {phrase1}, then {phrase2}. How many {item} does {name} have now?"
    return text, (first, _apply(first.result, op2, c))


def _two_groups_change(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    a, b, box = rng.randint(2, 9), rng.randint(2, 9), rng.choice(CONTAINERS)
    first = _apply(a, "*", b)
    phrase, c, op = _change(rng, first.result)
    text = (
        f"{name} buys {a} {box} with {b} {item} in each, then {phrase}. How many {item} does {name} have now?"
    )
    return text, (first, _apply(first.result, op, c))


def _two_change_times(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    other = rng.choice([n for n in NAMES if n != name])
    while True:
        a = rng.randint(2, 15)
        phrase, b, op = _change(rng, a, limit=10)
        first = _apply(a, op, b)
        if 1 <= first.result <= 20:
            break
    k = rng.randint(2, 5)
    text = (
        f"{name} has {a} {item} and {phrase}. {other} has {k} times as many {item} as {name} has now. "
        f"How many {item} does {other} have?"
    )
    return text, (first, _apply(first.result, "*", k))


def _two_change_share(rng: random.Random, name: str, item: str) -> tuple[str, tuple[Step, ...]]:
    while True:
        a = rng.randint(2, 20)
        phrase, b, op = _change(rng, a)
        first = _apply(a, op, b)
        divisors = [k for k in range(2, 6) if first.result % k == 0 and first.result // k >= 1]
        if divisors:
            break
    k = rng.choice(divisors)
    text = (
        f"{name} has {a} {item} and {phrase}, then shares them equally among {k} friends. "
        f"How many {item} does each friend get?"
    )
    return text, (first, _apply(first.result, "/", k))


Template = Callable[[random.Random, str, str], tuple[str, tuple[Step, ...]]]
TEMPLATES: dict[str, tuple[Template, ...]] = {
    SINGLE_STEP: (_single_change, _single_change, _single_groups, _single_times, _single_share),
    TWO_STEP: (_two_changes, _two_changes, _two_groups_change, _two_change_times, _two_change_share),
}


def generate_problems(n: int, kind: str, seed: int, exclude: Collection[str] = ()) -> list[Problem]:
    """`n` distinct problems of `kind`, none whose text is in `exclude`; same arguments, same list.

    The RNG is seeded by a string (hashed with SHA-512 by `random`), so it does not depend on
    PYTHONHASHSEED or on the platform.
    """
    if kind not in TEMPLATES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    rng = random.Random(f"nexus-retrofit/arithmetic/{kind}/{seed}")
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {kind} problems (got {len(problems)})")
        template = rng.choice(TEMPLATES[kind])
        text, steps = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if text in seen:
            continue
        seen.add(text)
        problems.append(Problem(text, steps, kind, f"arithmetic/{kind}/{seed}/{len(problems)}"))
    return problems


def to_math_row(p: Problem) -> dict:
    """The problem in the MATH-500 schema that the eval harness reads."""
    return {
        "problem": p.text,
        "solution": p.solution,
        "answer": str(p.answer),
        "subject": "arithmetic",
        "level": LEVELS[p.kind],
        "unique_id": p.unique_id,
    }


def to_messages(p: Problem) -> dict:
    """The problem as a conversational SFT row, prompted exactly as the eval harness prompts."""
    return {
        "messages": [
            {"role": "user", "content": MATH_PROMPT + p.text},
            {"role": "assistant", "content": p.solution},
        ]
    }


def eval_problems(size: int = EVAL_SIZE) -> list[Problem]:
    """The held-out set: `size` single-step then `size` two-step problems, interleaved."""
    single = generate_problems(size, SINGLE_STEP, EVAL_SEED)
    two = generate_problems(size, TWO_STEP, EVAL_SEED)
    return [p for pair in zip(single, two) for p in pair]


def sft_problems(size: int = SFT_SIZE, exclude: Collection[str] = ()) -> list[Problem]:
    """The demo's SFT set: two-step problems, disjoint from the eval set (and from `exclude`)."""
    held_out = {p.text for p in eval_problems()} | set(exclude)
    return generate_problems(size, TWO_STEP, SFT_SEED, exclude=held_out)


def held_out_texts() -> set[str]:
    """Texts of every shipped eval and SFT problem, which the pretraining corpus must not contain."""
    return {p.text for p in eval_problems()} | {p.text for p in sft_problems()}


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines, atomically (nexus_retrofit.safe_output: temp file, then os.replace)."""
    from ..safe_output import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_datasets(
    out: str | os.PathLike, eval_size: int = EVAL_SIZE, sft_size: int = SFT_SIZE
) -> dict[str, Path]:
    """Write `arith_sft.jsonl` (messages) and `arith_eval.jsonl` (MATH-500 schema) into `out`."""
    out = Path(out)
    evals = eval_problems(eval_size)
    sft = sft_problems(sft_size, exclude={p.text for p in evals})
    return {
        "sft": write_jsonl((to_messages(p) for p in sft), out / "arith_sft.jsonl"),
        "eval": write_jsonl((to_math_row(p) for p in evals), out / "arith_eval.jsonl"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for arith_sft.jsonl and arith_eval.jsonl")
    parser.add_argument("--eval-size", type=int, default=EVAL_SIZE, help="held-out problems per kind")
    parser.add_argument("--sft-size", type=int, default=SFT_SIZE, help="two-step SFT problems")
    args = parser.parse_args(argv)
    for name, path in write_datasets(args.out, args.eval_size, args.sft_size).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
