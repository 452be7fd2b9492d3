"""A randomly initialised Nexus model and its baseline from a model config (`nexus-retrofit init`).

Pretraining from scratch (the paper's Table 2 runs, here on Pythia) compares two models that differ
in the attention only. Both come from one random model: the base model is built from the config under
the seed and saved as the baseline; that same model is then converted with `convert`, so every base
tensor of the Nexus model is the baseline's bit for bit, and only the new inner modules and gates are
drawn (from the same seeded random stream, after the base weights). One folder holds both:

    OUTPUT/baseline   the base architecture, randomly initialised (a full checkpoint + tokenizer)
    OUTPUT/nexus      the same weights converted to Nexus (by default the paper's form: no gate,
                      random inner modules)
    OUTPUT/init.json  what was built from what: config source, seed, the nexus block, parameter counts

Everything is checked (settings, output folder, config, family, tokenizer) before anything is built
or written; the folder is written whole (safe_output.atomic_dir), as `convert` writes its output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    TOKENIZER_FILES,
    check_config_dict,
    check_source,
    pin_revision,
    read_source_config,
    torch_dtype,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from .modeling import NexusConfig

BASELINE, NEXUS, RECORD = "baseline", "nexus", "init.json"
WRITES = (BASELINE, NEXUS, RECORD)  # the entries init writes at the top of OUTPUT
PAPER_FORM = {"gate": "none"}  # X_p = Inner_p(X) with random inner modules (NexusConfig's inner_init default)

__all__ = [
    "BASELINE",
    "NEXUS",
    "RECORD",
    "InitPlan",
    "InitResult",
    "init_from_config",
    "plan_init",
    "write_init",
]


@dataclass(frozen=True)
class InitPlan:
    """Everything `write_init` needs, checked: nothing has been built or written yet."""

    source: str  # CONFIG as given
    config: PretrainedConfig
    revision: str | None
    settings: NexusConfig
    seed: int
    dtype: str
    output: Path
    overwrite: bool
    tokenizer: str | None  # where the tokenizer comes from (as given), None: no tokenizer
    tokenizer_folder: Path | None  # a local folder holding its files


@dataclass(frozen=True)
class InitResult:
    """What `init` wrote."""

    output: Path
    record: dict[str, Any]

    @property
    def baseline(self) -> Path:
        return self.output / BASELINE

    @property
    def nexus(self) -> Path:
        return self.output / NEXUS


def _read_config(source: str, revision: str | None) -> tuple[PretrainedConfig, str | None]:
    """The config of a Hub id, a local model folder or a config.json file, checked as `convert` checks
    a source (family, custom code, heads) from the raw JSON before transformers builds it."""
    from transformers import AutoConfig

    check_source(source)  # a local-looking path that does not exist: one line, no Hub look-up
    path = Path(source).expanduser()
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"CONFIG {source} is not a JSON config file ({e}); pass a config.json") from None
        if not isinstance(raw, dict):
            raise ValueError(f"CONFIG {source} is not a JSON object; pass a config.json")
    elif path.is_dir():
        raw = read_source_config(source)  # no config.json, or not JSON: one line naming the file
    else:
        revision = pin_revision(source, revision)  # config and tokenizer from one commit
        raw = _hub_config(source, revision)
    check_config_dict(raw, source)  # model_type in the family table, no custom modeling code, heads
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"CONFIG {source}: transformers cannot read it: {e}") from None
    config._name_or_path = ""  # a random model has no source weights: no base_model, no local path saved
    return config, revision


def _hub_config(source: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(source, "config.json", revision=revision)
        return json.loads(Path(file).read_text(encoding="utf-8"))
    # offline, unreachable, no such repo: huggingface_hub's errors are not all OSErrors
    except Exception as e:
        text = " ".join(str(e).split())[:120]
        raise OSError(
            f"could not read the config of {source!r} from the Hugging Face Hub: offline, pass a local model "
            f"folder or its config.json instead ({type(e).__name__}: {text})"
        ) from None


def _tokenizer_folder(source: str, revision: str | None, explicit: bool) -> Path | None:
    """A local folder with the tokenizer files of `source` (a folder, a config.json's folder or a Hub id),
    or None when it has none. Explicitly asked for (--tokenizer), having none is an error."""
    path = Path(source).expanduser()
    folder = path.parent if path.is_file() else path
    if not path.exists():
        if explicit:
            check_source(source)
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(source, revision=revision, allow_patterns=[*TOKENIZER_FILES, "config.json"])
            )
        except Exception as e:
            if not explicit:
                return None
            text = " ".join(str(e).split())[:120]
            raise OSError(
                f"--tokenizer {source}: could not download it from the Hugging Face Hub: offline, pass a local "
                f"tokenizer folder ({type(e).__name__}: {text})"
            ) from None
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    if explicit:
        raise ValueError(f"--tokenizer {source}: no tokenizer files there (tokenizer.json, vocab.json, ...)")
    return None


def _check_tokenizer(folder: Path, where: str, config: PretrainedConfig) -> None:
    """It loads, and every token id it can produce has a row in the embeddings."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raise several kinds; one line either way
        raise ValueError(f"{where}: the tokenizer does not load ({type(e).__name__}: {e})") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is {vocab}: ids "
            "past it have no embedding; pass a matching --tokenizer or raise vocab_size in the config"
        )


def plan_init(
    config: str | os.PathLike,
    output: str | os.PathLike,
    nexus: NexusConfig | None = None,
    *,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    overwrite: bool = False,
) -> InitPlan:
    """Check every input of `init` (raises ValueError/OSError, one line each); build or write nothing."""
    from .modeling import NexusConfig
    from .safe_output import check_output_dir

    settings = nexus if nexus is not None else NexusConfig(**PAPER_FORM)
    if not isinstance(settings, NexusConfig):
        raise TypeError(f"nexus must be a NexusConfig, got {type(settings).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    torch_dtype(dtype)  # one of auto, float32, bfloat16, float16
    out = check_output_dir(output, overwrite, flag="OUTPUT")
    source = str(config)
    base_config, revision = _read_config(source, revision)
    from .converter import nexus_model_config

    nexus_model_config(base_config, settings)  # the Nexus config builds (and validates) from this one
    if tokenizer is not None:
        where = f"--tokenizer {tokenizer}"
        folder = _tokenizer_folder(str(tokenizer), None, explicit=True)
    else:
        where = f"the tokenizer of CONFIG {source}"
        folder = _tokenizer_folder(source, revision, explicit=False)
    if folder is not None:
        _check_tokenizer(folder, where, base_config)
    return InitPlan(
        source=source,
        config=base_config,
        revision=revision,
        settings=settings,
        seed=seed,
        dtype=dtype,
        output=out,
        overwrite=overwrite,
        tokenizer=(str(tokenizer) if tokenizer is not None else source) if folder is not None else None,
        tokenizer_folder=folder,
    )


def _build_base(plan: InitPlan) -> PreTrainedModel:
    """The base model from the config, initialised under the seed (in fp32, then cast)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(plan.seed)
    model = AutoModelForCausalLM.from_config(plan.config, dtype=torch.float32)
    wanted = torch_dtype(plan.dtype)
    if wanted == "auto":  # the config's own dtype, as from_pretrained(dtype="auto") would load it
        wanted = getattr(plan.config, "dtype", None) or torch.float32
        wanted = getattr(torch, wanted) if isinstance(wanted, str) else wanted
    return model.to(wanted).eval()


def _parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def _copy_tokenizer(plan: InitPlan, target: Path) -> None:
    """Byte for byte, as `convert` copies a source's tokenizer (a reload could re-type it)."""
    import shutil

    if plan.tokenizer_folder is None:
        return
    for name in TOKENIZER_FILES:
        if (plan.tokenizer_folder / name).is_file():
            shutil.copy2(plan.tokenizer_folder / name, target / name)


def write_init(plan: InitPlan, command: str = "init") -> InitResult:
    """Build the baseline and its Nexus version and write OUTPUT (whole, atomically)."""
    import torch
    import transformers

    from . import __version__
    from .converter import convert
    from .safe_output import atomic_dir, atomic_write_text

    with atomic_dir(plan.output, plan.overwrite, command) as tmp:  # the lock first, then the work
        base = _build_base(plan)
        base_parameters = _parameters(base)
        base.save_pretrained(tmp / BASELINE)
        _copy_tokenizer(plan, tmp / BASELINE)
        architecture = type(base).__name__
        # The new parameters continue the seeded stream after the base weights: re-seeding here would
        # draw the inner modules from the same numbers as the first base weights.
        nexus = convert(base, plan.settings)  # moves the base tensors: `base` is not used again
        nexus.save_pretrained(tmp / NEXUS)
        _copy_tokenizer(plan, tmp / NEXUS)
        nexus_parameters = _parameters(nexus)
        record = {
            "config_source": plan.source,
            "revision": plan.revision,
            "model_type": plan.config.model_type,
            "seed": plan.seed,
            "dtype": str(next(nexus.parameters()).dtype).removeprefix("torch."),
            "tokenizer": plan.tokenizer,
            "nexus_block": plan.settings.to_dict(),  # the `nexus` block of OUTPUT/nexus/config.json
            BASELINE: {"architecture": architecture, "parameters": base_parameters},
            NEXUS: {
                "architecture": type(nexus).__name__,
                "parameters": nexus_parameters,
                "added_parameters": nexus_parameters - base_parameters,
            },
            "versions": {
                "nexus_retrofit": __version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
    return InitResult(plan.output, record)


def init_from_config(
    config: str | os.PathLike,
    output: str | os.PathLike,
    nexus: NexusConfig | None = None,
    *,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    overwrite: bool = False,
) -> InitResult:
    """Write a randomly initialised baseline and its Nexus version (same base weights) from a config.

    `config` is a Hub id, a local model folder or a config.json; `nexus` the Nexus settings (default:
    the paper's form, `NexusConfig(gate="none")`: no gate, random inner modules). The tokenizer is
    `tokenizer` (a folder or Hub id), else the config's own folder or repo when it has one. Writes
    OUTPUT/baseline, OUTPUT/nexus and OUTPUT/init.json; `overwrite` replaces an earlier init output
    (the user's own files in it stay). Same seed, same files.
    """
    plan = plan_init(
        config,
        output,
        nexus,
        seed=seed,
        tokenizer=tokenizer,
        dtype=dtype,
        revision=revision,
        overwrite=overwrite,
    )
    return write_init(plan)
