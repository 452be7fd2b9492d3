"""The embedded demo: a tiny pretrained Qwen2 model and the arithmetic data it was trained and is evaluated on.

The Hub is not reachable on the development machines and a random model makes a meaningless demo, so
the package ships a small pretrained checkpoint (rebuilt by `scripts/build_tiny_model.py`) and the
generated SFT and held-out sets (`python -m nexus_retrofit.demo.arithmetic`).
"""

from __future__ import annotations

from .assets import eval_data_path, sft_data_path, tiny_model_path

__all__ = ["eval_data_path", "sft_data_path", "tiny_model_path"]
