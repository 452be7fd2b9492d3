"""Paths of the shipped demo assets, resolved inside the installed package (not the working directory)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: rebuild it with `python -m nexus_retrofit.demo.arithmetic --out "
            f"{ASSETS / 'data'}` (data) or `python scripts/build_tiny_model.py` (model)"
        )
    return path


def tiny_model_path() -> Path:
    """Folder of the embedded tiny pretrained Qwen2 model (safetensors, tokenizer, TRAINING.md)."""
    return _existing(ASSETS / "tiny-qwen2")


def sft_data_path() -> Path:
    """JSON lines of two-step problems in conversational `messages` format, for the demo's SFT."""
    return _existing(ASSETS / "data" / "arith_sft.jsonl")


def eval_data_path() -> Path:
    """JSON lines of held-out problems in the MATH-500 schema (`level` 1 = single-step, 2 = two-step)."""
    return _existing(ASSETS / "data" / "arith_eval.jsonl")


def facts_text_path() -> Path:
    """Plain text, one paragraph of simple facts per line, for pretraining on a CPU (demo/facts.py)."""
    return _existing(ASSETS / "data" / "facts.txt")
