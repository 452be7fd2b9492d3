"""Streaming conversion: a Nexus checkpoint without ever holding the source model in memory.

A conversion only adds parameters (inner attention modules and gates); every pretrained tensor keeps
its name. So the source's safetensors shards are reused as they are (copied byte for byte, never
parsed) and the new parameters are written as shards of their own, `model-nexus-*.safetensors`,
with a `model.safetensors.index.json` that maps old and new tensors. Peak memory is one Nexus shard
(plus one layer's attention for inner_init="copy", plus one source shard when --dtype must rewrite it),
not the model. Shards are copied, not hard-linked: a hard link would be the source's own file, and a
later `save_pretrained` into the output (which truncates files in place) would rewrite the source.

The result is the in-memory path's (`converter.convert` + `save_pretrained`): the Nexus model is built
on the meta device after the same `torch.manual_seed(seed)`, and each attention's new parameters are
materialised by `converter._materialise_nexus_parameters` itself, attention by attention in module
order, so the random ones come out of the same RNG stream bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .modeling import FAMILIES, NexusAttentionMixin, NexusConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# `convert` streams by itself above this many bytes of source safetensors, or above half the free RAM.
AUTO_STREAMING_BYTES = 4 * 2**30
NEXUS_SHARD_BYTES = 2 * 2**30  # most bytes of new parameters per model-nexus-* shard (and in memory)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE_RENAMED = "model-00001-of-00001.safetensors"  # transformers prefers SINGLE_FILE to an index
NEXUS_SHARD = "model-nexus-{i:05d}-of-{n:05d}.safetensors"
# What a streaming conversion fetches from the Hub: weights, configs, index, tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class StreamingResult:
    """What a streaming conversion wrote (for the command's summary)."""

    architecture: str
    dtype: torch.dtype
    copied: list[str] = field(default_factory=list)  # source shards copied byte for byte
    rewritten: list[str] = field(default_factory=list)  # rewritten (dtype cast or tensors dropped)
    nexus_shards: list[str] = field(default_factory=list)
    nexus_bytes: int = 0


# ------------------------------------------------------------------------------------ the source
def source_folder(source: str, revision: str | None = None) -> Path:
    """A local folder with SOURCE's safetensors and json files (a Hub id is snapshot-downloaded)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))


def source_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file, chosen as transformers chooses (model.safetensors before the index)."""
    from safetensors import safe_open

    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / INDEX_FILE} has no weight_map; re-download or re-save the model")
        return weight_map
    raise ValueError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: streaming conversion reuses safetensors shards; "
        "convert with --no-streaming"
    )


def source_weight_bytes(source: str, revision: str | None = None) -> int | None:
    """Total size of SOURCE's *.safetensors files, without downloading them; None when unknown."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(source, revision=revision, files_metadata=True)
    except Exception:  # offline or unknown: the in-memory path reports its own error
        return None
    return sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def should_stream(source: str, revision: str | None = None) -> bool:
    """convert's default: stream when the source's safetensors exceed 4 GiB or half the available RAM."""
    size = source_weight_bytes(source, revision)
    if not size:  # no safetensors (or unknown): only the in-memory path can load it
        return False
    free = available_memory_bytes()
    return size > AUTO_STREAMING_BYTES or (free is not None and size > free // 2)


def _header(file: Path) -> dict[str, tuple[torch.dtype, int]]:
    """Each tensor's dtype and element count from the safetensors header (no data read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return {
            name: (_SAFETENSORS_DTYPES[s.get_dtype()], torch.Size(s.get_shape()).numel())
            for name, s in slices.items()
        }


def _resolve_dtype(
    dtype: str, config: PretrainedConfig, folder: Path, weight_map: dict[str, str]
) -> torch.dtype:
    """The dtype from_pretrained would load in: --dtype, else config.json's, else the first shard's."""
    from .checkpoint import torch_dtype

    chosen = torch_dtype(dtype)
    if chosen != "auto":
        return chosen
    if getattr(config, "dtype", None) is not None:  # what from_pretrained(dtype="auto") reads first
        return config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype)
    first = sorted(set(weight_map.values()))[0]
    floating = [d for d, _ in _header(folder / first).values() if d.is_floating_point]
    return floating[0] if floating else torch.get_default_dtype()


# ------------------------------------------------------------------------------ the Nexus model
def _meta_nexus_model(
    config: PretrainedConfig, settings: NexusConfig, dtype: torch.dtype, seed: int
) -> nn.Module:
    """The Nexus model on the meta device, built after the seed exactly as converter.convert builds it."""
    from .converter import nexus_model_config

    config.dtype = dtype  # from_pretrained records the loaded dtype in the config
    nexus_config = nexus_model_config(config, settings)
    torch.manual_seed(seed)  # convert.py seeds right before converter.convert builds its meta model
    with torch.device("meta"):
        model = FAMILIES[config.model_type][1](nexus_config)
    if getattr(nexus_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(dtype)  # free on meta; save_pretrained records model.dtype


def _saved_names(model: nn.Module) -> set[str]:
    """The tensor names save_pretrained would write: tied duplicates removed and the family's checkpoint
    renames reverted, as it does (GPT-NeoX's `lm_head` is saved as Pythia's `embed_out`)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return set(
        revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    )


class _OneAttention:
    """Stands in for the model in converter._materialise_nexus_parameters: its `modules()` yields one
    attention, so that function (the in-memory path's own code) initialises one layer at a time."""

    def __init__(self, model: nn.Module, attention: NexusAttentionMixin):
        self._model = model
        self._attention = attention

    def modules(self) -> Iterator[nn.Module]:
        return iter((self._attention,))

    def _init_weights(self, module: nn.Module) -> None:
        self._model._init_weights(module)


def _nexus_attentions(model: nn.Module) -> list[tuple[str, NexusAttentionMixin]]:
    """(prefix, module) of every Nexus attention in module order, the order the in-memory path uses."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NexusAttentionMixin)]


def _new_tensors(prefix: str, attention: nn.Module) -> dict[str, torch.Tensor]:
    from .modeling.names import is_nexus_parameter

    return {
        f"{prefix}.{name}": t
        for name, t in attention.state_dict().items()
        if is_nexus_parameter(f"{prefix}.{name}")
    }


def _own_names(prefix: str, attention: nn.Module) -> list[str]:
    """The attention's pretrained tensors (q/k/v/o_proj, norms), relative names."""
    from .modeling.names import is_nexus_parameter

    return [n for n in attention.state_dict() if not is_nexus_parameter(f"{prefix}.{n}")]


class _ShardReader:
    """Reads single tensors from the source shards, one file open at a time."""

    def __init__(self, folder: Path, weight_map: dict[str, str]):
        self.folder = folder
        self.weight_map = weight_map

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _materialise_one(
    model: nn.Module,
    prefix: str,
    attention: NexusAttentionMixin,
    settings: NexusConfig,
    reader: _ShardReader,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """One attention's new tensors, initialised by the in-memory path's code; its own tensors are
    loaded only when that code reads them (inner_init="copy"), else left unallocated (dtype/device only)."""
    from .converter import _materialise_nexus_parameters  # private: reused so the RNG order is the same

    own = _own_names(prefix, attention)
    if settings.inner_init == "copy":
        values = {n: reader.read(f"{prefix}.{n}", dtype) for n in own}
    else:  # only q_proj.weight's device and dtype are read: empty, never touched, costs no memory
        meta = attention.state_dict()
        values = {n: torch.empty(meta[n].shape, dtype=dtype) for n in own}
    attention.load_state_dict(values, strict=False, assign=True)
    _materialise_nexus_parameters(_OneAttention(model, attention), settings)
    new = _new_tensors(prefix, attention)
    attention.to_empty(device="meta")  # drop this layer's tensors before the next
    return {name: t.detach().contiguous() for name, t in new.items()}


def _plan_nexus_shards(model: nn.Module, dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Attention prefixes grouped into shards of at most max_bytes (an attention is never split)."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for prefix, attention in _nexus_attentions(model):
        nbytes = sum(t.numel() * size for t in _new_tensors(prefix, attention).values())
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(prefix)
        used += nbytes
    return [s for s in shards if s]


def _write_nexus_shards(
    model: nn.Module,
    settings: NexusConfig,
    reader: _ShardReader,
    dtype: torch.dtype,
    out: Path,
    max_bytes: int,
) -> dict[str, str]:
    """Materialise every attention's new parameters in module order, writing a shard whenever one fills."""
    from safetensors.torch import save_file

    plan = _plan_nexus_shards(model, dtype, max_bytes)
    attentions = dict(_nexus_attentions(model))
    weight_map: dict[str, str] = {}
    for i, prefixes in enumerate(plan, start=1):
        shard: dict[str, torch.Tensor] = {}
        for prefix in prefixes:
            shard.update(_materialise_one(model, prefix, attentions[prefix], settings, reader, dtype))
        name = NEXUS_SHARD.format(i=i, n=len(plan))
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    return weight_map


# ------------------------------------------------------------------------------- source shards
def _copy_shard(src: Path, dst: Path) -> None:
    """Copy byte for byte in the kernel (copy_file_range: no user-space buffer; a filesystem with
    reflinks shares the blocks), falling back to shutil; follows a Hub cache symlink to its blob."""
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            remaining = os.fstat(fin.fileno()).st_size
            while remaining > 0:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
                if copied == 0:
                    raise OSError("copy_file_range made no progress")
                remaining -= copied
    except (OSError, AttributeError):
        shutil.copyfile(src, dst)


def _rewrite_shard(src: Path, dst: Path, keep: set[str], dtype: torch.dtype) -> None:
    """The shard's kept tensors in `dtype`, read one tensor at a time (peak: the rewritten shard)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        for name in f.keys():
            if name in keep:
                t = f.get_tensor(name)
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _place_source_shards(
    folder: Path,
    weight_map: dict[str, str],
    keep: set[str],
    dtype: torch.dtype,
    out: Path,
    result: StreamingResult,
) -> dict[str, str]:
    """Reuse each source shard in the output (renaming a single model.safetensors); a shard with
    tensors of another floating dtype, or tensors save_pretrained would not write, is rewritten."""
    placed: dict[str, str] = {}
    for file in sorted(set(weight_map.values())):
        target = SINGLE_FILE_RENAMED if file == SINGLE_FILE else file
        if target.startswith("model-nexus-") or "/" in target:
            raise ValueError(f"source shard name {file!r} cannot be reused; convert with --no-streaming")
        dtypes = {name: d for name, (d, _) in _header(folder / file).items()}
        as_is = all(n in keep for n in dtypes) and all(
            d == dtype or not d.is_floating_point for d in dtypes.values()
        )
        if as_is:
            _copy_shard(folder / file, out / target)
            result.copied.append(target)
        else:
            _rewrite_shard(folder / file, out / target, keep, dtype)
            result.rewritten.append(target)
        placed.update({n: target for n in dtypes if n in keep})
    return placed


def _write_index(out: Path, weight_map: dict[str, str], model: nn.Module) -> None:
    """model.safetensors.index.json over old and new tensors (sizes read from the written headers)."""
    total = sum(
        numel * torch.empty((), dtype=d).element_size()
        for file in sorted(set(weight_map.values()))
        for d, numel in _header(out / file).values()
    )
    index = {
        "metadata": {"total_parameters": model.num_parameters(), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- entry
def convert_streaming(
    source: str,
    output_tmp_dir: str | os.PathLike,
    settings: NexusConfig,
    seed: int = 0,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_nexus_shard_bytes: int = NEXUS_SHARD_BYTES,
) -> StreamingResult:
    """Write the Nexus checkpoint of SOURCE into `output_tmp_dir` (an empty folder; tokenizer files
    are the caller's, as for the in-memory path) without loading the source model."""
    from transformers import AutoConfig, GenerationConfig

    from .checkpoint import check_config_dict

    out = Path(output_tmp_dir)
    folder = source_folder(source, revision)
    # the name the in-memory path records (config._name_or_path, base_model): SOURCE as given
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    check_config_dict(config.to_dict(), source)
    weight_map = source_weight_map(folder)
    target_dtype = _resolve_dtype(dtype, config, folder, weight_map)
    model = _meta_nexus_model(config, settings, target_dtype, seed)
    saved = _saved_names(model)
    _check_coverage(saved, weight_map, source)
    try:  # as from_pretrained does: the source's generation config, else the model config's defaults
        model.generation_config = GenerationConfig.from_pretrained(source, revision=revision)
    except OSError:
        pass
    model.save_pretrained(out, state_dict={})  # config.json (auto_map), generation config, bundled code

    result = StreamingResult(type(model).__name__, target_dtype)
    reader = _ShardReader(folder, weight_map)
    nexus_map = _write_nexus_shards(model, settings, reader, target_dtype, out, max_nexus_shard_bytes)
    result.nexus_shards = sorted(set(nexus_map.values()))
    result.nexus_bytes = sum((out / f).stat().st_size for f in result.nexus_shards)
    base_map = _place_source_shards(folder, weight_map, saved, target_dtype, out, result)
    _write_index(out, {**base_map, **nexus_map}, model)
    return result


def _check_coverage(saved: set[str], weight_map: dict[str, str], source: str) -> None:
    """Every pretrained tensor the Nexus model saves must be in the source shards (the in-memory path
    would initialise a missing one at random, which a reused shard cannot reproduce)."""
    from .modeling.names import is_nexus_parameter

    missing = sorted(n for n in saved if not is_nexus_parameter(n) and n not in weight_map)
    if missing:
        raise ValueError(
            f"{source}'s safetensors lack {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])}); "
            "convert with --no-streaming"
        )
