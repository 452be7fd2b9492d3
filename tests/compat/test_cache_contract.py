"""The bundled modeling code fails loudly, never silently, when transformers hands it the cache differently.

transformers 5.24 renamed the keyword that carries the KV cache into attention (`past_key_values` ->
`cache`); the Nexus attention read the old name, got None and decoded without its cache, off by up
to 0.6 in logits with no error. These cases simulate the next such change on whatever release is
installed: the cache arrives under an unknown name, or not at all, while the model is decoding.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from nexus_retrofit import NexusConfig, convert
from nexus_retrofit.modeling import NexusAttentionMixin
from nexus_retrofit.modeling.compat import cache_keyword, cache_kwargs
from nexus_retrofit.modeling.configuration_nexus import TESTED_TRANSFORMERS
from tests.conftest import perturb_nexus, tiny_base_model

CACHE_NAMES = ("cache", "past_key_values")


def _model(inner: str = "separate", attn: str = "eager"):
    model = convert(tiny_base_model("qwen2", attn=attn), NexusConfig(order=2, inner=inner))
    perturb_nexus(model)
    return model


def _reroute_cache(model, to: str | None) -> None:
    """Make every decoder layer hand its cache to attention under `to` (None: drop it), as a future
    transformers release with another keyword would."""

    def hook(module, args, kwargs):
        cache = None
        for name in CACHE_NAMES:
            cache = kwargs.pop(name, None) or cache
        if to is not None:
            kwargs[to] = cache
        return args, kwargs

    for module in model.modules():
        if isinstance(module, NexusAttentionMixin):
            module.register_forward_pre_hook(hook, with_kwargs=True)


def _prefill_then_step(model, **step_kwargs):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :4], **cache_kwargs(model, cache), use_cache=True)
        return model(ids[:, 4:], **cache_kwargs(model, cache), use_cache=True, **step_kwargs).logits


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_the_cache_is_taken_under_either_name(name):
    """Cached decoding equals the full forward whichever keyword carries the cache."""
    model = _model()
    _reroute_cache(model, name)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    assert (_prefill_then_step(model)[:, -1] - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "reroute,attn,message",
    [
        pytest.param("kv_cache", "eager", "unknown keyword", id="renamed-eager"),
        pytest.param("kv_cache", "sdpa", "unknown keyword", id="renamed-sdpa"),
        pytest.param(None, "eager", "passed no cache", id="dropped-eager"),
        pytest.param(None, "sdpa", "passed no cache", id="dropped-sdpa"),
    ],
)
def test_a_decode_without_the_cache_raises(reroute, attn, message):
    model = _model(attn=attn)
    _reroute_cache(model, reroute)
    with pytest.raises(RuntimeError, match=message) as error:
        _prefill_then_step(model)
    text = str(error.value)
    assert f"transformers {transformers.__version__}" in text and TESTED_TRANSFORMERS[0] in text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param({"use_cache": True}, "use_cache=True", id="use_cache"),
        pytest.param({"position_ids": torch.tensor([[7]])}, "position 7", id="one-token-at-position-7"),
        pytest.param({"cache_position": torch.tensor([7])}, "cache position 7", id="cache_position"),
        pytest.param({"attention_mask": torch.ones(1, 1, 1, 8)}, "against 8", id="mask-longer-than-query"),
    ],
)
def test_each_sign_of_decoding_is_recognised(kwargs, message):
    """The attention module called directly, with no cache, and one sign that earlier tokens exist."""
    model = _model()
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 1, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(x, torch.tensor([[7]]))
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(RuntimeError, match=message):
        attention(x, cos_sin, mask, **kwargs)


def test_a_full_forward_without_a_cache_is_fine():
    """No false alarm: training-style forwards (no cache, use_cache=False) with left padding run."""
    model = _model()
    ids = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
    logits = model(ids, attention_mask=(ids != 0).long(), use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_static_cache_is_refused_before_any_work():
    model = _model()
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_implementation="static")


def test_cache_keyword_follows_the_installed_release():
    model = _model()
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert cache_keyword(model) == ("cache" if major_minor >= (5, 24) else "past_key_values")


@pytest.mark.parametrize("installed", ["5.15.1", "4.57.0"])
def test_a_transformers_older_than_the_minimum_is_refused_in_one_line(monkeypatch, installed):
    """Loading the bundled configuration file under an old release names the minimum, at import."""
    import nexus_retrofit.modeling.configuration_nexus as bundled

    monkeypatch.setattr(transformers, "__version__", installed)
    spec = importlib.util.spec_from_file_location("old_release_configuration_nexus", bundled.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError) as error:
        spec.loader.exec_module(module)
    assert str(error.value).count("\n") == 0
    assert f"transformers>={TESTED_TRANSFORMERS[0]}" in str(error.value) and installed in str(error.value)
    assert "old_release_configuration_nexus" not in sys.modules
