"""Evaluation harness: MATH-500, AIME24, GPQA-Diamond (and custom tasks), vLLM or transformers.

Light to import: torch, transformers, datasets and vLLM are imported only when a run needs them.
"""

from __future__ import annotations

from .answers import GPQA_PROMPT, MATH_PROMPT, last_boxed
from .grading import Verdict, extract_letter, get_grader, register_grader
from .runner import EvalSettings, evaluate, grade_samples, task_metrics
from .tasks import (
    Problem,
    Task,
    TaskError,
    get_task,
    list_tasks,
    load_task_file,
    register_task,
)

__all__ = [
    "EvalSettings",
    "GPQA_PROMPT",
    "MATH_PROMPT",
    "Problem",
    "Task",
    "TaskError",
    "Verdict",
    "evaluate",
    "extract_letter",
    "get_grader",
    "get_task",
    "grade_samples",
    "last_boxed",
    "list_tasks",
    "load_task_file",
    "register_grader",
    "register_task",
    "task_metrics",
]
