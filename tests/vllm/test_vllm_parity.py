"""vLLM runs Nexus checkpoints exactly like the HF implementation (nexus_retrofit.modeling).

For every `inner` (separate, shared, self), orders 1-3, several projection sets, both gates and all
four families: greedy generations of a batch of prompts of different lengths equal HF `generate`
token for token, and vLLM's logprob of every generated token equals HF's log_softmax within
LOGPROB_TOL (fp32). The engine runs with 32-token KV blocks (the smallest vLLM CPU attention takes), chunked prefill in 32-token chunks
(the longest prompt is prefilled over three steps; generation crosses block boundaries) and prefix caching (a second pass over the same
prompts reuses cached blocks of every sub-attention and must give the same result).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from nexus_retrofit import NexusConfig  # noqa: E402
from tests.vllm.checkpoints import build_checkpoint, hf_greedy, random_prompts, vllm_engine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_in_process")]

LOGPROB_TOL = 1e-4  # fp32; measured worst case across the table below: see the report in each test
MAX_NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 30, 70)

CASES = [
    pytest.param(
        family,
        NexusConfig(order=order, projections=proj, inner=inner, **gating),
        compiled,
        id=f"{family}-{inner}-m{order}-{proj}-"
        + "-".join(map(str, gating.values()))
        + ("-compiled" if compiled else ""),
    )
    for family, inner, order, proj, gating, compiled in [
        ("qwen2", "separate", 2, "qk", {"gate": "zero"}, False),
        ("qwen2", "separate", 2, "qk", {}, False),  # the defaults: open gate, zero inner o_proj
        ("qwen2", "shared", 2, "qk", {"gate": "zero"}, False),
        ("qwen2", "self", 2, "qk", {"gate": "zero"}, False),
        ("qwen2", "separate", 3, "qkv", {"gate": "zero"}, False),
        # compiled: torch.compile, vLLM's default (not enforce_eager)
        ("qwen2", "self", 3, "qkv", {"gate": "zero"}, True),
        ("qwen2", "shared", 3, "q", {"gate": "none"}, False),
        ("qwen2", "shared", 2, "qk", {"gate": "zero", "gate_shape": "head", "gate_fn": "tanh"}, False),
        ("qwen2", "separate", 2, "qk", {"gate_shape": "head"}, False),
        ("llama", "self", 2, "qk", {"gate": "zero", "gate_shape": "head"}, False),
        ("qwen2", "self", 2, "q", {"gate": "zero", "gate_shape": "scalar", "gate_fn": "tanh"}, False),
        ("llama", "separate", 2, "qkv", {"gate": "zero"}, False),
        ("llama", "self", 2, "kv", {"gate": "none"}, False),
        ("qwen3", "separate", 2, "qk", {"gate": "zero"}, False),
        ("mistral", "shared", 2, "qk", {"gate": "zero"}, False),
        ("gpt_neox", "separate", 2, "qk", {}, False),
        ("gpt_neox", "separate", 3, "qkv", {"gate": "zero"}, False),
        ("gpt_neox_sequential", "shared", 2, "qk", {"gate": "none"}, False),
        ("gpt_neox_sequential", "self", 2, "qkv", {"gate": "zero", "gate_shape": "head"}, True),
        (
            "llama",
            "separate",
            1,
            "qk",
            {"gate": "zero"},
            False,
        ),  # order 1: standard attention, no inner calls
    ]
]


@pytest.mark.parametrize("family,nexus,compiled", CASES)
def test_vllm_matches_hf(family, nexus, compiled, tmp_path):
    path = build_checkpoint(tmp_path / "ckpt", family, nexus)
    vocab_size = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    prompts = random_prompts(vocab_size, PROMPT_LENGTHS)
    reference = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    assert all(len(tokens) == MAX_NEW_TOKENS for tokens, _ in reference)

    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=1, ignore_eos=True, detokenize=False
    )
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    start = time.perf_counter()
    options = dict(
        block_size=32, max_num_batched_tokens=32, enable_prefix_caching=True, enforce_eager=not compiled
    )
    with vllm_engine(path, **options) as llm:
        started = time.perf_counter()
        runs = [llm.generate(requests, params, use_tqdm=False) for _ in range(2)]  # 2nd: prefix-cache hits
    print(
        f"\n{family}/{nexus}: engine start {started - start:.1f} s, generation {time.perf_counter() - started:.1f} s"
    )

    worst = 0.0
    for run in runs:
        for prompt, (ref_tokens, ref_logprobs), out in zip(prompts, reference, run):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            assert tokens == ref_tokens, f"prompt of {len(prompt)} tokens: vLLM {tokens} != HF {ref_tokens}"
            logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
            diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
            worst = max(worst, diff)
    print(f"max |logprob diff| vs HF: {worst:.2e}; tokens {[r[0] for r in reference]}")
    assert worst <= LOGPROB_TOL
    assert runs[1][2].num_cached_tokens > 0, "the second pass should hit the prefix cache"
