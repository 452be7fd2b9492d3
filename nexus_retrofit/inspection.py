"""What a (Nexus) checkpoint costs: parameters, attention calls per layer, KV-cache size.

Parameter counts are read from the safetensors headers (exact, no weights loaded), so inspecting a
7B checkpoint takes milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .modeling import NexusConfig
from .modeling.nexus_core import reading

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class CacheSlot:
    name: str
    kv_heads: int  # heads stored per token (keys and values each)


@dataclass
class Inspection:
    path: str
    architecture: str
    model_type: str
    nexus: dict | None
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params_total: int | None
    params_added: int | None
    paper_attention_calls: int
    distinct_attention_calls: int
    kernel_calls: int
    cache_slots: list[CacheSlot] = field(default_factory=list)
    written_with_transformers: str | None = None  # config.json's `transformers_version`
    code_tested_on_transformers: str | None = None  # the bundled code's range (`nexus_tested_transformers`)

    @property
    def params_base(self) -> int | None:
        return None if self.params_total is None else self.params_total - self.params_added

    @property
    def cache_ratio(self) -> float:
        """KV-cache bytes per token relative to the base model's."""
        return sum(s.kv_heads for s in self.cache_slots) / self.num_kv_heads

    def cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        # keys + values, every slot of every layer
        return 2 * _BYTES[dtype] * self.head_dim * self.num_layers * sum(s.kv_heads for s in self.cache_slots)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            params_base=self.params_base,
            cache_ratio=self.cache_ratio,
            cache_bytes_per_token_bf16=self.cache_bytes_per_token(),
        )
        return d


def kv_heads_of(config: PretrainedConfig) -> int:
    """Key/value heads: num_key_value_heads (GQA families), else one per query head (GPT-NeoX)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def cache_slots(config: PretrainedConfig) -> list[CacheSlot]:
    """One KV-cache slot per distinct sub-attention of a layer (docs/DESIGN.md §2)."""
    heads, kv_heads = config.num_attention_heads, kv_heads_of(config)
    slots = [CacheSlot("outer", kv_heads)]
    nexus = getattr(config, "nexus", None)
    if not nexus:
        return slots
    nexus = NexusConfig.from_dict(nexus)
    count = {"q": heads, "k": kv_heads, "v": kv_heads}
    for sub in reading(nexus.inner).sub_attentions(nexus.projections, nexus.order):
        # the cache keeps the keys' heads: `self`'s q side attends over every query head
        slots.append(CacheSlot(sub.label, count[sub.heads[1]]))
    return slots


def count_parameters(folder: Path) -> tuple[int, int] | None:
    """(total, added by Nexus) from the safetensors headers, or None without safetensors files."""
    from safetensors import safe_open

    from .modeling.names import is_nexus_parameter

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = added = 0
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in seen:
                    continue
                seen.add(name)
                shape = f.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
                added += n if is_nexus_parameter(name) else 0
    return total, added


def inspect_config(
    config: PretrainedConfig, params: tuple[int, int] | None = None, path: str = ""
) -> Inspection:
    nexus = getattr(config, "nexus", None)
    settings = NexusConfig.from_dict(nexus) if nexus else NexusConfig(order=1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total, added = params if params is not None else (None, None)
    return Inspection(
        path=path,
        architecture=(getattr(config, "architectures", None) or ["?"])[0],
        model_type=config.model_type,
        nexus=nexus,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=kv_heads_of(config),
        head_dim=head_dim,
        params_total=total,
        params_added=added,
        paper_attention_calls=settings.paper_attention_calls,
        distinct_attention_calls=settings.distinct_attention_calls,
        kernel_calls=settings.order,  # the sub-attentions of one level run as one fused call
        cache_slots=cache_slots(config),
        written_with_transformers=getattr(config, "transformers_version", None),
        code_tested_on_transformers=getattr(config, "nexus_tested_transformers", None),
    )


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Inspect a local checkpoint folder without loading its weights."""
    from transformers import AutoConfig

    import nexus_retrofit.modeling  # noqa: F401  (registers the Nexus configs)

    from .checkpoint import check_safetensors, read_source_config
    from .modeling import FAMILIES

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a checkpoint folder")
    raw = read_source_config(str(folder))  # a clear error for a missing or malformed config.json
    model_type = str(raw.get("model_type"))
    if model_type.removeprefix("nexus_") not in FAMILIES:
        raise ValueError(
            f"{folder}: model_type {model_type!r} is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    check_safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{folder}/config.json could not be read as a {model_type} config: {e}") from None
    report = inspect_config(config, count_parameters(folder), str(folder))
    # What the file says, not what the config class of the running code fills in.
    report.code_tested_on_transformers = raw.get("nexus_tested_transformers")
    return report


def inspection_json(report: Inspection) -> str:
    return json.dumps(report.to_dict(), indent=2)
