"""transformers' other decoding strategies on a Nexus model: each gives what it gives without the cache.

A Nexus cache holds `num_hidden_layers x (1 + levels)` layers (one per inner level, appended on first
use), so code that reads `len(cache)` as the layer count, or edits only the first `num_hidden_layers`
layers, would drift. Beam search reorders and repeats the cache per beam, assisted decoding (an
assistant model, or prompt lookup) crops it back after rejected draft tokens: every row here runs a strategy with the cache and asserts it equals the same
strategy recomputing every step from scratch (`use_cache=False`), or, for assisted decoding, plain
greedy decoding (its guarantee). transformers' GenerationTesterMixin, which tests these on stock
models, is not in the sdist the transformers suite runs (docs/transformers-model-tests.md).
"""

from __future__ import annotations

import pytest
import torch

from nexus_retrofit import NexusConfig, convert
from tests.conftest import perturb_nexus, tiny_base_model

MAX_NEW_TOKENS = 8
TOL = 1e-5  # fp32 logits; a stale or misaligned cache layer moves them by ~1e-2 and more


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0, msg=lambda m: f"{msg}: {m}")


# (family, Nexus settings): every inner kind with a live inner path (perturbed inner weights), order 3
# for a second inner level, GPT-NeoX for the partial rotary.
FORMS = [
    pytest.param("qwen2", dict(inner="separate", order=2), id="qwen2-separate-m2"),
    pytest.param("llama", dict(inner="shared", order=2), id="llama-shared-m2"),
    pytest.param("mistral", dict(inner="self", order=2), id="mistral-self-m2"),
    pytest.param("qwen2", dict(inner="separate", order=3, projections="qkv"), id="qwen2-separate-m3-qkv"),
    pytest.param("gpt_neox", dict(inner="shared", order=3), id="gpt_neox-shared-m3"),
]

BEAMS = dict(num_beams=3, num_return_sequences=2, length_penalty=1.0, early_stopping=False)


def _model(family: str, settings: dict):
    model = convert(tiny_base_model(family), NexusConfig(**settings))
    perturb_nexus(model)
    return model.eval()


def _prompts(model, rows: slice = slice(None)) -> dict:
    """Two left-padded prompts, the second 2 tokens shorter (padding, rows of different lengths); the
    first repeats a 3-gram, so prompt lookup finds drafts in it."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=generator)
    ids[0, 6:] = ids[0, 1:4]
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = model.config.pad_token_id, 0
    return dict(input_ids=ids[rows], attention_mask=mask[rows])


def _generate(model, rows: slice = slice(None), **kwargs):
    """generate()'s output with the tokens, the scores and the logits of every step."""
    settings = dict(
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,  # no early stop at an EOS: every step is compared
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
        **kwargs,
    )
    with torch.no_grad():
        return model.generate(**_prompts(model, rows), **settings)


@pytest.mark.parametrize("family, settings", FORMS)
def test_beam_search_with_the_cache_equals_it_without(family, settings):
    """Beam search reorders the cache by beam after every step and repeats it per beam at the start."""
    model = _model(family, settings)
    cached = _generate(model, **BEAMS)
    uncached = _generate(model, use_cache=False, **BEAMS)
    assert cached.sequences.shape == (2 * BEAMS["num_return_sequences"], 9 + MAX_NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    # the scores see a beam's stale history at once, the tokens only when it flips a ranking
    assert_close(cached.sequences_scores, uncached.sequences_scores)
    for step, (with_cache, without) in enumerate(zip(cached.logits, uncached.logits)):
        assert_close(with_cache, without, msg=f"step {step}")


@pytest.mark.parametrize(
    "assist",
    [
        pytest.param(dict(prompt_lookup_num_tokens=3), id="prompt_lookup"),
        pytest.param("same_model", id="assistant_model"),
    ],
)
@pytest.mark.parametrize("family, settings", FORMS)
def test_assisted_decoding_equals_greedy(family, settings, assist):
    """Draft tokens are verified by one forward over them and the cache is cropped back past the first
    rejected one: every inner level's cache layer must be cropped with the outer ones. The first prompt
    repeats a 3-gram, so prompt lookup proposes drafts (cropping only the outer layers fails these rows);
    the assistant rows run two Nexus caches side by side, the assistant a differently perturbed copy."""
    model = _model(family, settings)
    if assist == "same_model":
        assistant = _model(family, settings)
        perturb_nexus(assistant, seed=7)
        assist = dict(assistant_model=assistant)
    for row in range(2):  # assisted decoding takes one row at a time
        rows = slice(row, row + 1)
        assisted, greedy = _generate(model, rows, **assist), _generate(model, rows)
        assert torch.equal(assisted.sequences, greedy.sequences)
        for step, (a, g) in enumerate(zip(assisted.logits, greedy.logits, strict=True)):
            assert_close(a, g, msg=f"row {row}, step {step}")
