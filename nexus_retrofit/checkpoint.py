"""Checkpoint folders: validate and load a source model, copy its tokenizer files.

Writing output folders (atomic rename, markers, --overwrite rules) lives in `nexus_retrofit.safe_output`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype | str:
    """'auto' or a torch dtype for a --dtype option value."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def looks_local(source: str) -> bool:
    """True when `source` can only mean a local path (a Hub id is `name` or `org/name`)."""
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    first = Path(source).parts[0] if Path(source).parts else ""
    return "/" in source and Path(first).exists()  # e.g. runs/typo where runs/ exists here


def check_source(source: str) -> None:
    """Fail at once on a local-looking SOURCE that does not exist (instead of retrying the Hub)."""
    if looks_local(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(
            f"could not load {source}: no such local folder (a Hub id looks like org/name); check the path"
        )


def pin_revision(source: str, revision: str | None = None) -> str | None:
    """The commit a Hub SOURCE's `revision` (default: main) points at now, so that config, weights and
    tokenizer all come from one commit even if the branch moves during a long download. A local folder,
    or offline mode (the cache resolves its own refs), keeps `revision` as given."""
    check_source(source)
    if Path(source).expanduser().is_dir():
        return revision
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return revision
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(source, revision=revision).sha or revision
    except HfHubHTTPError as e:  # the Hub answered: no such repo or revision, or no access
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise OSError(
            f"could not find {source} (revision {revision or 'main'}) on the Hub (HTTP {status}): check the id "
            "and revision, and for a gated or private model log in (`hf auth login`)"
        ) from None
    except Exception as e:  # the Hub is unreachable: the downloads fall back to the cache, as before
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
            return revision
        raise


def check_safetensors(folder: str | os.PathLike) -> None:
    """Read every *.safetensors header in `folder`; a corrupt or truncated file is a ValueError."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except SafetensorError as e:
            raise ValueError(f"{file} is corrupt or truncated ({e}); re-download or re-save it") from None


def check_config_dict(config: dict, source: str) -> None:
    """Refuse, from config.json alone, what convert cannot handle (so no weights are loaded first)."""
    from .modeling import FAMILIES

    model_type = config.get("model_type")
    if config.get("nexus") is not None or str(model_type).startswith("nexus_"):
        raise ValueError(f"{source} is already a Nexus model ({model_type}); convert the original base model")
    custom = _custom_model_code(config.get("auto_map"))
    if custom:
        more = f" and {len(custom) - 1} more" if len(custom) > 1 else ""
        raise ValueError(
            f"{source}: config.json's auto_map names its own modeling code ({custom[0]}{more}), not the stock "
            f"transformers {model_type!r} architecture: convert would replace that code with the stock "
            f"{model_type!r} one. If that code is exactly the stock architecture, remove auto_map from "
            "config.json and convert again"
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads > heads or heads % kv_heads):
        raise ValueError(
            f"{source}: num_key_value_heads={kv_heads} must divide num_attention_heads={heads}; "
            "fix config.json"
        )
    if model_type == "gpt_neox":
        _check_rotary_layout(config, source)


def _check_rotary_layout(config: dict, source: str) -> None:
    """GPT-NeoX's partial rotary: the first int(head_size * rotary_pct) channels of each head rotate in
    pairs (rotate_half), so that count must be even and at least 2; a head size must be whole."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0):
        return
    if hidden % heads:
        raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    field, pct = "rotary_pct", config.get("rotary_pct")
    if pct is None:
        field, pct = "rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor", 0.25)
    if not isinstance(pct, (int, float)) or not 0 < pct <= 1:
        raise ValueError(f"{source}: {field}={pct!r} must be in (0, 1]")
    rotary = int(hidden // heads * pct)
    if rotary < 2 or rotary % 2:
        raise ValueError(
            f"{source}: {field}={pct} rotates {rotary} of the {hidden // heads} channels of each head; RoPE "
            "rotates channel pairs, so that must be an even number >= 2: a rotary layout this code does not handle"
        )


def _custom_model_code(auto_map: object) -> list[str]:
    """The `auto_map` entries of a config.json that name a model's own config or model classes, as
    "AutoModelForCausalLM: modeling_x.XForCausalLM" (the causal LM first); a tokenizer's custom code
    does not count (convert copies tokenizer files as they are)."""
    if not auto_map:
        return []
    if not isinstance(auto_map, dict):
        return [f"auto_map: {auto_map!r}"]
    keys = sorted(
        (k for k in auto_map if str(k).startswith("AutoModel") or k == "AutoConfig"),
        key=lambda k: (k != "AutoModelForCausalLM", k),
    )
    return [f"{k}: {auto_map[k]}" for k in keys]


def read_source_config(source: str, revision: str | None = None) -> dict:
    """config.json of a local folder or Hub id as a dict, with clear errors for a missing or bad file."""
    check_source(source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"could not load {source}: no config.json (not a Hugging Face model folder)"
            )
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(source, "config.json", revision=revision))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object; fix or re-download it")
    return config


def load_causal_lm(
    source: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedModel:
    """Load a causal LM from a local folder or a Hub id. Never enables remote code by itself."""
    from transformers import AutoModelForCausalLM

    import nexus_retrofit.modeling  # noqa: F401  (registers the Nexus classes: no remote code needed)

    check_source(source)
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
