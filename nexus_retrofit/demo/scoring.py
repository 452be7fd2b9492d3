"""Greedy exact-match scoring of the demo model on arithmetic problems (MATH-500-schema rows).

A fast, dependency-free check used by the build script and the tests: the integer in the last
`\\boxed{}` of the greedy completion must equal the row's `answer`. The full eval harness grades with
math-verify instead; on integer answers the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..evaluation.answers import last_boxed
from .arithmetic import MATH_PROMPT

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def is_correct(completion: str, answer: str) -> bool:
    """True when the last boxed value of `completion` is the integer `answer`."""
    predicted = last_boxed(completion)
    try:
        return predicted is not None and int(predicted) == int(answer)
    except ValueError:
        return False


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    batch_size: int = 100,
    max_new_tokens: int = 80,
) -> list[str]:
    """Greedy completions of the chat-templated math prompt, batched with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
        for start in range(0, len(problems), batch_size):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": MATH_PROMPT + p}], tokenize=False, add_generation_prompt=True
                )
                for p in problems[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def greedy_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], batch_size: int = 100
) -> float:
    """Fraction of MATH-schema `rows` whose greedy completion boxes the right integer."""
    if not rows:
        raise ValueError("no rows to score")
    completions = greedy_completions(model, tokenizer, [r["problem"] for r in rows], batch_size)
    return sum(is_correct(c, r["answer"]) for c, r in zip(completions, rows)) / len(rows)


def paired_comparison(base: Sequence[dict], other: Sequence[dict]) -> dict[str, float | int | str]:
    """Compare two models' graded greedy samples on the same problems (eval harness records).

    Returns the number of problems, how many completions differ, both accuracies, the accuracy
    difference (other - base) and its paired standard error (both models answer the same problems,
    so the per-problem difference has a much smaller spread than the two binomial errors combined),
    and a verdict: "better"/"worse" when the difference exceeds 2 standard errors, "same" when no
    answer changed correctness, else "no significant difference".
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"need the same non-empty problems on both sides, got {len(base)} and {len(other)}")
    n = len(base)
    deltas = [int(bool(o["correct"])) - int(bool(b["correct"])) for b, o in zip(base, other)]
    mean = sum(deltas) / n
    var = sum((d - mean) ** 2 for d in deltas) / (n - 1) if n > 1 else 0.0
    stderr = (var / n) ** 0.5
    if not any(deltas):
        verdict = "same"
    elif abs(mean) > 2 * stderr:
        verdict = "better" if mean > 0 else "worse"
    else:
        verdict = "no significant difference"
    return {
        "n": n,
        "differ": sum(b["completion"] != o["completion"] for b, o in zip(base, other)),
        "accuracy_base": sum(bool(b["correct"]) for b in base) / n,
        "accuracy_other": sum(bool(o["correct"]) for o in other) / n,
        "difference": mean,
        "difference_stderr": stderr,
        "verdict": verdict,
    }
