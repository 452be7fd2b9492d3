"""Generation backends with one interface: chat-templated prompts in, n completions each out.

- `vllm`: one `LLM.generate` per call over all prompts, `n` samples per prompt, a seed per prompt
  (vLLM seeds each request on its own, so a prompt's samples do not depend on what else is batched);
  tensor parallel inside one engine, data parallel as one engine process per GPU group.
- `hf`: transformers `generate` with left padding; runs on CPU. The global torch seed is set from the
  seeds of the batch, so the same batch gives the same samples (the runner keeps batches fixed
  across resumes, see runner.py).

Both load Nexus checkpoints through the package's registered classes (no remote code); any other
custom-code model needs the user's explicit `trust_remote_code=True`. Prompts are tokenized here
with `add_special_tokens=False`: the chat template already holds the special tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .tasks import stable_int

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from transformers import GenerationConfig, PreTrainedTokenizerBase


class BackendError(RuntimeError):
    """The backend cannot run as asked; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every backend (temperature 0 means greedy)."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """The n completions of one prompt and their token counts (EOS included, padding not)."""

    completions: list[str]
    num_tokens: list[int]


class Backend(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        """One Generation per prompt; `seeds[i]` seeds prompt i's samples."""

    def close(self) -> None: ...


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user_message: str,
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> str:
    """The text the model sees: the chat template with a generation prompt, or the bare message."""
    if not use_chat_template:
        return f"{system_prompt}\n\n{user_message}" if system_prompt else user_message
    if not getattr(tokenizer, "chat_template", None):
        raise BackendError(
            "the tokenizer has no chat template; the benchmarks are scored on chat-templated prompts. Use a chat "
            "model, set tokenizer.chat_template, or pass --no-chat-template to send the bare prompt"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user_message}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    """`vllm` when it is installed, else `hf`."""
    return "vllm" if vllm_available() else "hf"


def _eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> list[int]:
    ids: list[int] = []
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise BackendError("neither the tokenizer nor the generation config defines an EOS token")
    return ids


# ----------------------------------------------------------------------------------------------- hf
class HFBackend:
    """transformers `generate`, batched with left padding (CPU or one GPU)."""

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        import nexus_retrofit  # noqa: F401  registers the Nexus classes: no remote code needed for them

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            model, trust_remote_code=trust_remote_code, revision=revision
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise BackendError(f"the tokenizer of {model} has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision
        )
        self.model.to(self.device).eval()
        self.eos_token_id = _eos_ids(self.tokenizer, self.model.generation_config)
        # Start from a blank generation config: a checkpoint's defaults (top_k=20, repetition_penalty...)
        # would silently change the sampling that results.json records. Only the special tokens are kept.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id, bos_token_id=None
        )
        self._generation_config_cls = GenerationConfig

    def _config(self, sampling: Sampling, greedy: bool) -> GenerationConfig:
        common = dict(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_penalty=1.0,
        )
        if greedy:
            return self._generation_config_cls(do_sample=False, num_return_sequences=1, **common)
        return self._generation_config_cls(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,  # off, as in vLLM: the global default top_k=50 would cut the distribution
            num_return_sequences=sampling.n,
            **common,
        )

    def generate(self, prompts: Sequence[str], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        torch = self.torch
        greedy = sampling.temperature == 0
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        torch.manual_seed(stable_int("hf-batch", *seeds) % (2**63))
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self._config(sampling, greedy))
        new = out[:, batch["input_ids"].shape[1] :].cpu()
        per_prompt = 1 if greedy else sampling.n
        results = []
        for i in range(len(prompts)):
            texts, counts = [], []
            for row in new[i * per_prompt : (i + 1) * per_prompt]:
                ids = row.tolist()
                end = next((j + 1 for j, t in enumerate(ids) if t in self.eos_token_id), len(ids))
                texts.append(self.tokenizer.decode(ids[:end], skip_special_tokens=True))
                counts.append(end)
            if greedy:  # greedy samples are identical: generate once, count n
                texts, counts = texts * sampling.n, counts * sampling.n
            results.append(Generation(texts, counts))
        return results

    def close(self) -> None:
        del self.model


# --------------------------------------------------------------------------------------------- vllm
def _vllm_worker(
    rank: int, gpus: str, llm_kwargs: dict, jobs: Queue, results: Queue
) -> None:  # pragma: no cover - needs vLLM
    """One data-parallel engine on its own GPUs: runs (prompt ids, params) jobs until told to stop."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    from vllm import LLM

    llm = LLM(**llm_kwargs)
    results.put((rank, "ready", None))
    while True:
        job = jobs.get()
        if job is None:
            return
        job_id, prompt_ids, params = job
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        results.put((rank, job_id, [[(o.text, len(o.token_ids)) for o in out.outputs] for out in outputs]))


class VLLMBackend:
    """vLLM offline inference: `LLM.generate` with `SamplingParams(n=..., seed=...)` per prompt."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        revision: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        **engine_options: Any,
    ) -> None:
        """`engine_options` go to `vllm.LLM` as they are (e.g. enforce_eager, kv_cache_memory_bytes)."""
        try:
            import vllm  # noqa: F401  (its `vllm.general_plugins` entry point registers the Nexus models)
        except ImportError as e:
            raise BackendError(
                "the vllm backend needs vLLM: pip install 'nexus-retrofit[vllm]', or use --backend hf"
            ) from e
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model, trust_remote_code=trust_remote_code, revision=revision
        )
        kwargs: dict[str, Any] = dict(
            model=model,
            tokenizer=model,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_options)
        self.data_parallel_size = data_parallel_size
        if data_parallel_size == 1:
            from vllm import LLM

            self.llm = LLM(**kwargs)
            return
        self._start_workers(kwargs, tensor_parallel_size, data_parallel_size)

    def _start_workers(self, kwargs: dict, tp: int, dp: int) -> None:
        import multiprocessing as mp

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            devices = [d for d in visible.split(",") if d]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        if len(devices) < tp * dp:
            raise BackendError(
                f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {tp * dp} GPUs, found {len(devices)}"
            )
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs, self.workers = [], []
        for rank in range(dp):
            jobs = ctx.Queue()
            gpus = ",".join(devices[rank * tp : (rank + 1) * tp])
            worker = ctx.Process(
                target=_vllm_worker, args=(rank, gpus, kwargs, jobs, self.results), daemon=True
            )
            worker.start()
            self.jobs.append(jobs)
            self.workers.append(worker)
        for _ in range(dp):
            self.results.get()  # "ready" from each engine
        self._job = 0

    def _params(self, sampling: Sampling, seeds: Sequence[int]) -> list:
        from vllm import SamplingParams

        return [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=sampling.max_new_tokens,
                seed=int(seed % (2**31)),
            )
            for seed in seeds
        ]

    def generate(self, prompts: Sequence[str], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = self._params(sampling, seeds)
        if self.data_parallel_size == 1:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
            return [
                Generation([o.text for o in out.outputs], [len(o.token_ids) for o in out.outputs])
                for out in outputs
            ]
        # Round-robin shards; per-request seeds make the split irrelevant to the samples.
        self._job += 1
        dp = self.data_parallel_size
        for rank in range(dp):
            self.jobs[rank].put((self._job, prompt_ids[rank::dp], params[rank::dp]))
        merged: list[Generation | None] = [None] * len(prompts)
        for _ in range(dp):
            rank, job_id, shard = self.results.get()
            if job_id != self._job:
                raise BackendError(f"data-parallel worker {rank} answered job {job_id}, expected {self._job}")
            for k, samples in enumerate(shard):
                merged[rank + k * dp] = Generation([t for t, _ in samples], [n for _, n in samples])
        return merged  # type: ignore[return-value]

    def close(self) -> None:
        """Shut the engine(s) down and free their memory, so a notebook can load the next model."""
        if self.data_parallel_size > 1:
            for jobs in self.jobs:
                jobs.put(None)
            for worker in self.workers:
                worker.join(timeout=30)
            return
        import gc

        from vllm.distributed import cleanup_dist_env_and_memory

        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()


def make_backend(name: str, model: str, **options: Any) -> Backend:
    """Build the backend `name` ("hf" or "vllm"); options irrelevant to it are dropped."""
    if name == "hf":
        keep = ("dtype", "device", "trust_remote_code", "revision")
        if options.get("tensor_parallel_size", 1) != 1 or options.get("data_parallel_size", 1) != 1:
            raise BackendError("tensor/data parallel sizes apply to --backend vllm only")
        return HFBackend(model, **{k: v for k, v in options.items() if k in keep})
    if name == "vllm":
        keep = (
            "dtype",
            "tensor_parallel_size",
            "data_parallel_size",
            "seed",
            "trust_remote_code",
            "revision",
            "max_model_len",
            "gpu_memory_utilization",
        )
        return VLLMBackend(model, **{k: v for k, v in options.items() if k in keep})
    raise BackendError(f"unknown backend {name!r}; choose 'vllm' or 'hf'")
