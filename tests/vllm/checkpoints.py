"""Tiny Nexus checkpoints (head_dim 64, fp32) with a byte-level BPE tokenizer, built offline in seconds.

vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16), hence head_dim 64. Gates and inner
weights are perturbed: with a zero gate a Nexus model equals its base model and hides every bug.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from nexus_retrofit import NexusConfig, convert
from tests.conftest import perturb_nexus

EOS = "<|endoftext|>"
VOCAB = 320
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Nexus attention refines queries and keys with an inner attention before the outer one.",
    "Solve 12 + 35 = 47, then 47 * 2 = 94. Therefore, the final answer is: $\\boxed{94}$.",
    "Answer the following multiple choice question. Answer: B",
    "vLLM serves large language models with paged attention and continuous batching.",
] * 20

_COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=512,
)
GQA = dict(num_key_value_heads=1)
PYTHIA_ROPE = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
)
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, **GQA)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, **GQA)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(head_dim=64, sliding_window=None, **GQA)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=64, tie_word_embeddings=True, **GQA)),
    # Pythia's layout: a quarter of each head rotates, biases, LayerNorm; both residual forms
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(use_parallel_residual=True, **PYTHIA_ROPE)),
    "gpt_neox_sequential": (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        dict(use_parallel_residual=False, tie_word_embeddings=True, **PYTHIA_ROPE),
    ),
}


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    fast.chat_template = CHATML
    return fast


def build_checkpoint(out: Path, family: str, nexus: NexusConfig, seed: int = 0, **overrides) -> Path:
    """Random base model of `family`, converted with `nexus`, perturbed, saved with its tokenizer.

    `overrides` change the base config (e.g. more heads for a tensor-parallel test)."""
    config_cls, model_cls, extra = FAMILIES[family]
    tokenizer = build_tokenizer()
    fields = {
        **_COMMON,
        **extra,
        "vocab_size": len(tokenizer),  # every id the model can emit detokenizes
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    config = config_cls(**fields)
    torch.manual_seed(seed)
    base = model_cls(config).eval()
    model = convert(base, nexus)
    perturb_nexus(model, seed=seed + 1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def random_prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 7) -> list[list[int]]:
    """Token-id prompts of the given lengths (no EOS id 0)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(
    path: Path, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """Reference: HF `generate` (greedy, no EOS stop), one prompt at a time, with the log_softmax
    of the raw logits at each generated token: (tokens, logprobs) per prompt."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # the package's registered class: no remote code
    assert type(model).__module__.startswith("nexus_retrofit."), type(model)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, generation_config=config)
            tokens = out.sequences[0, ids.shape[1] :].tolist()
            logprobs = [torch.log_softmax(x[0].double(), -1)[t].item() for x, t in zip(out.logits, tokens)]
            assert len(tokens) == max_new_tokens
            results.append((tokens, logprobs))
    return results


@contextlib.contextmanager
def vllm_engine(path: Path, **kwargs):
    """A `vllm.LLM` for `path` (fp32, eager, tiny KV cache), shut down and cleaned up on exit.

    The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller before
    the first engine): a spawned engine re-imports vLLM, 15-60 s per start on a loaded 2-core box.
    The multi-process path (plugin loaded by entry point in fresh processes) is what `vllm serve`
    exercises in test_vllm_serve.py.
    """
    import vllm
    from vllm.distributed import cleanup_dist_env_and_memory

    options = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
    )
    options.update(kwargs)
    llm = vllm.LLM(model=str(path), **options)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
