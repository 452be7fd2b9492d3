"""Resuming weights that a checkpoint stores under another name.

transformers 5 renames some parameters when it saves (GPT-NeoX's `lm_head` is written as `embed_out`,
the name in the published Pythia checkpoints) and renames them back in `from_pretrained`. The
Trainer's resume loads `model.safetensors` with a plain `load_state_dict`: the renamed tensors are
"unexpected keys" and the model keeps their start values. Measured (transformers 5.24, a tiny
GPT-NeoX, stock and Nexus): a run resumed at step 2 diverged from the uninterrupted one at step 3
and its `lm_head` was the initial one. Here the renamed tensors are loaded under their saved names,
asking transformers which names it writes (the reverse of its loading conversion, as save_pretrained
does), so nothing depends on one family's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def saved_names(model: nn.Module) -> dict[str, str]:
    """{state-dict name: the name save_pretrained writes it under}, for the tensors it renames."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a release without weight conversions renames nothing
        return {}
    state = model.state_dict()
    owner = {id(tensor): name for name, tensor in state.items()}
    saved = revert_weight_conversion(model, dict(state))
    # a renamed tensor is the same object under a name the model does not have (tied ones keep theirs)
    return {owner[id(t)]: name for name, t in saved.items() if name not in state and id(t) in owner}


def load_renamed_weights(model: nn.Module, checkpoint: str | Path) -> list[str]:
    """Copy the renamed tensors of a checkpoint folder's safetensors into `model`; their model names."""
    from safetensors import safe_open

    folder = Path(checkpoint)
    if not ((folder / SINGLE).is_file() or (folder / INDEX).is_file()):  # e.g. a LoRA adapter checkpoint
        return []
    renamed = saved_names(model)
    if not renamed:
        return []
    if (folder / INDEX).is_file():
        shard_of = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
    else:
        shard_of = {}
    state = model.state_dict()
    loaded = []
    with torch.no_grad():
        for own, saved in renamed.items():
            file = folder / shard_of.get(saved, SINGLE)
            if not file.is_file():
                continue
            with safe_open(str(file), framework="pt") as f:
                if saved not in f.keys():
                    continue
                state[own].copy_(f.get_tensor(saved))
            loaded.append(own)
    return loaded
