"""Average attention maps of a (Nexus) causal LM: the paper's Figure 2 as arrays.

Captured through the model's own forward: every attention call of a Nexus layer, outer and inner, goes
through transformers' attention dispatch (`ALL_ATTENTION_FUNCTIONS` under `config._attn_implementation`),
so this module registers one implementation of its own, ``nexus_maps``: the family's eager attention,
which also hands its softmax weights to a recorder. A call is told apart by the `layer_idx` of the module
it is given (docs/DESIGN.md §2): a layer's own index for its outer call; for inner level l of layer i the
cache slot ``num_hidden_layers + i·(m−1) + (l−1)``, whose heads are that level's sub-attentions stacked
in the order of ``Reading.sub_attentions`` (nexus_core: the cache layout). No modeling code is changed
or patched, and no family's module names are assumed.

Each map is the mean over layers, heads and texts of the (n, n) softmax weights: rows sum to 1 and the
upper triangle is 0 (causal). Inputs are unpadded token ids (B, n), every row a whole text.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from .modeling import NexusAttentionMixin, NexusConfig
from .modeling.nexus_core import Dims, SubAttention, reading

IMPLEMENTATION = "nexus_maps"
OUTER = "outer"

__all__ = ["IMPLEMENTATION", "OUTER", "AttentionMap", "MapKind", "map_kinds", "capture_attention_maps"]


@dataclass(frozen=True)
class MapKind:
    """One map a model gives: its name (a file stem), what it is, and how many heads it averages."""

    name: str
    title: str
    level: int | None = None  # None: the outer attention
    heads: int | None = None  # heads of one call of this kind (None: all heads of the call)


@dataclass(frozen=True)
class AttentionMap:
    """An average attention map: `weights` (n, n), the mean of `count` maps (layers x heads x texts)."""

    name: str
    title: str
    weights: np.ndarray
    layers: int
    heads: int
    texts: int

    @property
    def count(self) -> int:
        return self.layers * self.heads * self.texts


def _inner_name(sub: SubAttention, projections: tuple[str, ...]) -> tuple[str, str]:
    """(file stem, title) of one sub-attention, named as the paper's Figure 2 (Nexus_Q, Nexus_K, ...)."""
    who = "".join(projections).upper() if sub.projection is None else sub.projection.upper()
    what = f"shared inner attention for {', '.join(projections)}" if sub.projection is None else (
        f"inner attention of {sub.projection}"
    )  # fmt: skip
    return f"inner_{sub.name}", f"Nexus_{who}, level {sub.level}: {what}"


def map_kinds(nexus: NexusConfig | None, dims: Dims | None = None) -> list[MapKind]:
    """The maps of a model with these Nexus settings (None: a base model), outer first, then one per
    sub-attention (per refined projection and level; `shared`: per level) in cache order."""
    if nexus is None or nexus.levels == 0:
        return [MapKind(OUTER, "attention" if nexus is None else "outer attention (order 1)")]
    kinds = [MapKind(OUTER, f"outer attention (level {nexus.order} of order {nexus.order})")]
    for sub in reading(nexus.inner).sub_attentions(nexus.projections, nexus.order):
        name, title = _inner_name(sub, nexus.projections)
        kinds.append(MapKind(name, title, sub.level, None if dims is None else dims.of(sub.heads[0])))
    return kinds


def family_eager(model: nn.Module) -> Callable:
    """The eager attention of the model's family (`eager_attention_forward` of the first transformers
    model module in its class hierarchy, e.g. Qwen2's for a Nexus Qwen2), else Llama's."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
            if found is not None:
                return found
    return llama_eager


class _Recorder:
    """Sums of the softmax weights per map kind, from the calls of one capture."""

    def __init__(self, eager: Callable, layout: dict[int, list[MapKind]]):
        self.eager = eager
        self.layout = layout  # slot -> the kinds whose heads it stacks, in head order
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.seen: dict[int, int] = {}

    def add(self, slot: int, weights: torch.Tensor) -> None:
        if weights is None or weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
            shape = None if weights is None else tuple(weights.shape)
            raise RuntimeError(f"attention slot {slot}: expected (batch, heads, n, n) weights, got {shape}")
        kinds = self.layout.get(slot)
        if kinds is None:
            raise RuntimeError(
                f"an attention call came with layer index {slot}, which is neither a layer nor an inner "
                f"cache slot of this model's Nexus layout (slots {min(self.layout)}-{max(self.layout)})"
            )
        sizes = [k.heads if k.heads is not None else weights.shape[1] for k in kinds]
        if sum(sizes) != weights.shape[1]:
            raise RuntimeError(
                f"attention slot {slot} has {weights.shape[1]} heads; its sub-attentions "
                f"{[k.name for k in kinds]} imply {sizes}: the Nexus head layout is not the one expected"
            )
        for kind, block in zip(kinds, weights.detach().split(sizes, dim=1)):
            total = block.to(torch.float64).sum(dim=(0, 1))
            self.sums[kind.name] = self.sums[kind.name] + total if kind.name in self.sums else total
            self.counts[kind.name] = self.counts.get(kind.name, 0) + block.shape[0] * block.shape[1]
        self.seen[slot] = self.seen.get(slot, 0) + 1


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("nexus_attention_maps", default=None)


def _recording_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `nexus_maps` attention: the family's eager attention, its weights recorded by layer index."""
    recorder = _ACTIVE.get()
    if recorder is None:
        raise RuntimeError(
            f"attn_implementation {IMPLEMENTATION!r} records attention maps and runs only inside "
            "nexus_retrofit.attention_maps.capture_attention_maps; set another implementation"
        )
    out, weights = recorder.eager(module, query, key, value, attention_mask, **kwargs)
    recorder.add(module.layer_idx, weights)
    return out, weights


# Process-wide registrations (idempotent): the eager kernel that records, with eager's float mask.
AttentionInterface.register(IMPLEMENTATION, _recording_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def _nexus_attentions(model: nn.Module) -> list[NexusAttentionMixin]:
    return [m for m in model.modules() if isinstance(m, NexusAttentionMixin)]


def _layout(model: PreTrainedModel) -> tuple[dict[int, list[MapKind]], list[MapKind]]:
    """Which map kinds each attention call (by layer index) contributes to, and the kinds in order."""
    layers = model.config.num_hidden_layers
    attentions = _nexus_attentions(model)
    nexus = attentions[0].nexus if attentions else None
    kinds = map_kinds(nexus, attentions[0].dims if attentions else None)
    layout = {i: [kinds[0]] for i in range(layers)}
    if nexus is not None and len(attentions) != layers:
        raise ValueError(f"the model has {len(attentions)} Nexus attentions for {layers} layers")
    for i in range(layers):
        for level in range(1, (nexus.levels if nexus is not None else 0) + 1):
            slot = layers + i * nexus.levels + (level - 1)  # docs/DESIGN.md §2: the inner cache slots
            layout[slot] = [k for k in kinds if k.level == level]
    return layout, kinds


@contextlib.contextmanager
def _implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """The model's attention implementation set to `name` for the block, then back as it was."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        if model.config._attn_implementation != name:  # a release that would not switch: say so
            raise RuntimeError(f"could not set {type(model).__name__}'s attention implementation to {name!r}")
        yield
    finally:
        model.set_attn_implementation(before)


def capture_attention_maps(model: PreTrainedModel, input_ids: torch.Tensor) -> dict[str, AttentionMap]:
    """Run `model` once on `input_ids` (B, n: unpadded texts of one length) through its own attention
    path, and return its average attention maps by name: `outer`, then one per Nexus sub-attention
    (`inner_q_level1`, ...; a base model has `outer` only). Each is a float64 (n, n) array."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, n) token ids with n >= 1, got {tuple(input_ids.shape)}")
    layout, kinds = _layout(model)
    recorder = _Recorder(family_eager(model), layout)
    was_training = model.training
    token = _ACTIVE.set(recorder)
    try:
        model.eval()
        with _implementation(model, IMPLEMENTATION), torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        _ACTIVE.reset(token)
        model.train(was_training)
    missing = sorted(slot for slot in layout if recorder.seen.get(slot) != 1)
    if missing:
        raise RuntimeError(
            f"attention calls for layer indices {missing} did not arrive once each through transformers' "
            "attention dispatch: the maps would be incomplete"
        )
    layers, texts = model.config.num_hidden_layers, input_ids.shape[0]
    maps = {}
    for kind in kinds:
        count = recorder.counts[kind.name]
        maps[kind.name] = AttentionMap(
            kind.name,
            kind.title,
            (recorder.sums[kind.name] / count).cpu().numpy(),
            layers,
            count // (layers * texts),
            texts,
        )
    return maps
