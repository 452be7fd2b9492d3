"""The Nexus Qwen decoder layers build what vLLM's own constructors build, but for the attention.

vLLM's Qwen2/Qwen3 decoder layers take no attention class (Llama's take `attn_layer_type`, which the
plugin uses), so the plugin has its own `__init__` and inherits vLLM's `forward`. If a vLLM release
adds, removes or swaps a module or attribute in those constructors, the inherited `forward` could read
something the Nexus layer lacks, or the Nexus layer could build an outdated module. This test reads
both constructors and fails naming the difference.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

pytest.importorskip("vllm")

from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer  # noqa: E402
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer  # noqa: E402

from nexus_retrofit.vllm import models  # noqa: E402

pytestmark = pytest.mark.vllm


def _built(init: object) -> dict[str, object]:
    """`self.NAME = ...` in a constructor -> the class it calls (resolved in its module), else None."""
    source = textwrap.dedent(inspect.getsource(init))
    namespace = vars(inspect.getmodule(init))
    built: dict[str, object] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                call = node.value.func if isinstance(node.value, ast.Call) else None
                built[target.attr] = namespace.get(call.id) if isinstance(call, ast.Name) else None
    return built


@pytest.mark.parametrize(
    "stock,nexus",
    [(Qwen2DecoderLayer, models.NexusQwen2DecoderLayer), (Qwen3DecoderLayer, models.NexusQwen3DecoderLayer)],
    ids=["qwen2", "qwen3"],
)
def test_nexus_qwen_layer_builds_what_vllms_constructor_builds(stock, nexus):
    assert issubclass(nexus, stock)  # forward is vLLM's
    theirs, ours = _built(stock.__init__), _built(models._NexusQwenDecoderLayer.__init__)
    assert set(theirs) == set(ours), (
        f"vLLM's {stock.__name__} now builds {sorted(theirs)}; ours {sorted(ours)}"
    )
    for name in theirs.keys() - {"self_attn"}:
        assert theirs[name] is ours[name], f"{name}: vLLM builds {theirs[name]}, the Nexus layer {ours[name]}"
    assert ours["self_attn"] is None  # built by the family's `_attention`, a Nexus attention


# (layer_types, refused). Before: vLLM 0.34 moved its own check into the decoder layer's constructor,
# which the Nexus layer skips, so a mixed layout was served with one window for every layer.
WINDOW_LAYOUTS = [
    pytest.param(["full_attention", "full_attention"], False, id="all-full"),
    pytest.param(["sliding_attention", "sliding_attention"], False, id="all-sliding"),
    pytest.param(["full_attention", "sliding_attention"], True, id="mixed"),
]


@pytest.mark.parametrize("layer_types, refused", WINDOW_LAYOUTS)
def test_the_plugin_refuses_a_mixed_sliding_window_layout(layer_types, refused):
    from types import SimpleNamespace

    config = SimpleNamespace(nexus={"order": 2}, is_causal=True, layer_types=layer_types)
    if refused:
        with pytest.raises(NotImplementedError, match="sliding window on some layers but not all"):
            models._check_nexus_config(config)
    else:
        models._check_nexus_config(config)


def test_the_plugin_refuses_the_token_mlp_control():
    from types import SimpleNamespace

    config = SimpleNamespace(nexus={"order": 2, "inner": "mlp"}, is_causal=True, layer_types=None)
    with pytest.raises(NotImplementedError, match="inner='mlp' is the experiments' token-wise control"):
        models._check_nexus_config(config)
