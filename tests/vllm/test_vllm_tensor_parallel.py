"""Tensor parallelism: two CPU ranks give HF's greedy tokens and logprobs.

4 query heads, 2 KV heads over 2 ranks: each rank holds 2 query heads and 1 KV head (GPT-NeoX: 4 heads,
2 per rank, cut out of its fused per-head query_key_value). The `self`
variant's gates are per head (heads * head_dim), so they are sharded like the heads: this checks
that every rank loads its own slice of each gate. (1 KV head over 2 ranks, where KV heads are
replicated, was checked by hand the same way.) Workers are fresh processes: the architectures come
from the entry point there too.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from nexus_retrofit import NexusConfig  # noqa: E402
from tests.vllm.checkpoints import build_checkpoint, hf_greedy, random_prompts, vllm_engine  # noqa: E402

LOGPROB_TOL = 1e-4  # fp32, as in test_vllm_parity.py
MAX_NEW_TOKENS = 16

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.usefixtures("vllm_in_process")]


CASES = [  # (family, Nexus settings, base config overrides)
    pytest.param("qwen2", dict(inner="self"), dict(num_key_value_heads=2), id="qwen2-self-gqa"),
    # GPT-NeoX: each rank takes its heads' rows out of the per-head interleaved query_key_value
    pytest.param("gpt_neox", dict(inner="separate"), {}, id="gpt_neox-separate"),
]


@pytest.mark.parametrize("family,settings,overrides", CASES)
def test_tensor_parallel_matches_hf(tmp_path, family, settings, overrides):
    nexus = NexusConfig(order=2, projections="qkv", **settings)
    path = build_checkpoint(
        tmp_path / "ckpt", family, nexus, hidden_size=256, num_attention_heads=4, **overrides
    )
    prompts = random_prompts(300, (5, 40))
    reference = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=1, ignore_eos=True, detokenize=False
    )
    start = time.perf_counter()
    with vllm_engine(path, tensor_parallel_size=2) as llm:
        print(f"\nTP=2 engine start {time.perf_counter() - start:.1f} s")
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    worst = 0.0
    for (ref_tokens, ref_logprobs), out in zip(reference, outputs):
        completion = out.outputs[0]
        assert list(completion.token_ids) == ref_tokens
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        worst = max(worst, *(abs(a - b) for a, b in zip(logprobs, ref_logprobs)))
    print(f"TP=2 max |logprob diff| vs HF: {worst:.2e}")
    assert worst <= LOGPROB_TOL
