"""Checkpoint folders: load a source model, write a converted one atomically.

A checkpoint folder is written under a temporary name next to its destination and renamed at the
end, so an interrupted run never leaves a folder that looks complete; existing user data is only
replaced with `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`; refuse a file outright."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a folder; choose another path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {output} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `output` only if the block finishes without error."""
    output = Path(output).resolve()
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def torch_dtype(name: str):
    """'auto' or a torch dtype for a --dtype option value."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def load_causal_lm(
    source: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None
):
    """Load a causal LM from a local folder or a Hub id. Never enables remote code by itself."""
    from transformers import AutoModelForCausalLM

    import nexus_retrofit.modeling  # noqa: F401  (registers the Nexus classes: no remote code needed)

    if not Path(source).exists() and source.count("/") > 1:
        raise FileNotFoundError(f"source {source!r} is neither a local folder nor a Hub id (org/name)")
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision
    )


# Files that make up a tokenizer (and its chat template) in a Hugging Face folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def save_tokenizer_files(source: str, target: Path, revision: str | None = None) -> bool:
    """Copy the source's tokenizer files byte for byte into `target`; False if it has none.

    Copying (rather than loading and saving) keeps the tokenizer exactly as published: a reload
    through AutoTokenizer may re-type it from the model config.
    """
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, allow_patterns=list(TOKENIZER_FILES)))
    copied = False
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
            copied = True
    return copied
