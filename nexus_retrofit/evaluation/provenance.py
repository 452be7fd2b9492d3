"""Provenance of an `eval` run: which model (config and a content fingerprint, or the Hub commit)
and which package versions produced a results.json, so a resume or a model card never takes stale
scores for this model's."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (
        "nexus-retrofit",
        "torch",
        "transformers",
        "math-verify",
        "latex2sympy2_extended",
        "datasets",
        "vllm",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# Files that decide what a model generates: hashed whole into the fingerprint. Not checkpoints'
# optimizer or trainer state, which do not change the weights.
FINGERPRINT_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*.json", "tokenizer.model",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
    "*.py",
)  # fmt: skip


def _looks_local(model: str) -> bool:
    """A path rather than a Hub id ('org/name'): absolute, ./ ../ ~, or more than one '/'."""
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model in (".", "..")


def local_fingerprint(folder: Path) -> dict[str, Any]:
    """sha256 over the bytes of the files that decide the model's output (weights, config, tokenizer).

    Content, not dates: a copied folder keeps its fingerprint and a retrain into the same folder (same
    shapes, same sizes) changes it. The cost is one read of the weights (about 1 s per GB, cached by
    the OS for the load that follows), paid once per `eval` invocation.
    """
    digest = hashlib.sha256()
    names = sorted({p.name for pattern in FINGERPRINT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return {"kind": "local", "sha256": digest.hexdigest(), "files": len(names)}


def hub_fingerprint(model: str, revision: str | None, pinned: str | None = None) -> dict[str, Any]:
    """A Hub model's commit: the one `revision` was pinned to (checkpoint.pin_revision), else read
    from the local Hugging Face cache (no network): the snapshot folder the loader resolves `revision`
    to is named by its commit. None when neither is known."""
    if pinned and len(pinned) == 40 and pinned != revision:
        return {"kind": "hub", "repo": model, "revision": revision, "commit": pinned}
    commit = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        if isinstance(cached, str):
            commit = Path(cached).parent.name
    except Exception:  # a malformed id or cache: recorded as unknown
        commit = None
    return {"kind": "hub", "repo": model, "revision": revision, "commit": commit}


def model_info(model: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """The model's path, config and fingerprint (config.json for a local folder, else AutoConfig).

    A path that looks local must exist and hold a config.json (a typo'd folder is an error at once,
    not a long retry against the Hub).
    """
    path = Path(model).expanduser()
    config = None
    load_revision = revision
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"model {model}: {path / 'config.json'} is not valid JSON ({e})") from None
        model = str(path.resolve())
        fingerprint = local_fingerprint(path)
    elif path.exists() or _looks_local(model):
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise ValueError(f"model {model}: the folder {path.resolve()} {what}")
    else:
        from ..checkpoint import pin_revision

        try:  # the commit the revision points at now: config, weights and fingerprint all from it
            load_revision = pin_revision(model, revision)
        except OSError as e:
            raise ValueError(f"model {e}") from None
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                model, revision=load_revision, trust_remote_code=trust_remote_code
            ).to_dict()
        except Exception:  # recorded as unknown; loading the backend will tell what is wrong
            config = None
        fingerprint = hub_fingerprint(model, revision, pinned=load_revision)
    return {
        "path": model,
        "revision": revision,
        "load_revision": load_revision,  # what the backend loads: the pinned commit for a Hub model
        "fingerprint": fingerprint,
        "config": config,
        "nexus": (config or {}).get("nexus"),
    }
