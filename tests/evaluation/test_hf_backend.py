"""End to end with a real (tiny, random) model on the `hf` backend, and the import-guarded vLLM check."""

from __future__ import annotations

import json

import pytest

from nexus_retrofit.evaluation import EvalSettings, evaluate, grade_samples
from nexus_retrofit.evaluation.backends import BackendError, HFBackend, Sampling, render_prompt


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_eval_runs_all_three_tasks_on_local_data(cli, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "eval", tiny_model_dir, "--tasks", "math_500,aime24,gpqa_diamond", "--backend", "hf",
        "--max-new-tokens", "8", "--limit", "3", "--num-samples", "2", "--temperature", "0.7", "--seed", "5",
        "--data-dir", data_dir, "--output-dir", out, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["settings"]["backend"] == "hf"
    assert (
        results["settings"]["temperature"],
        results["settings"]["seed"],
        results["settings"]["limit"],
    ) == (0.7, 5, 3)
    for task, n in (("math_500", 2), ("aime24", 2), ("gpqa_diamond", 2)):
        entry = results["tasks"][task]
        assert (entry["n_problems"], entry["n_samples"]) == (3, n)
        lines = read_lines(out / f"samples_{task}.jsonl")
        assert len(lines) == 3 * n
        # the reported numbers are the samples' own: pass@1 over problems, failures over samples
        assert entry["pass@1"] == pytest.approx(sum(bool(r["correct"]) for r in lines) / len(lines))
        assert entry["extraction_failure_rate"] == pytest.approx(
            sum(r["extracted"] is None for r in lines) / len(lines)
        )
        assert all(1 <= r["num_tokens"] <= 8 for r in lines)
        assert all(
            r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n")
            for r in lines
        )
        # the stored verdicts are what the grader says about the stored completions
        _, correct, extracted = grade_samples(task, lines)
        assert correct == [r["correct"] for r in lines] and extracted == [r["extracted"] for r in lines]
    assert {r["gold"] for r in read_lines(out / "samples_gpqa_diamond.jsonl")} <= set("ABCD")
    assert "math_500" in result.output and "pass@1" in result.output


class Interrupting:
    """Wraps a backend and raises KeyboardInterrupt (Ctrl-C) on its `at`-th generate call."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.tokenizer = inner.tokenizer

    def generate(self, prompts, sampling, seeds):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.generate(prompts, sampling, seeds)

    def close(self):
        pass


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), dtype="float32", device="cpu")


def test_hf_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, data_dir, hf_backend):
    s = EvalSettings(
        model=str(tiny_model_dir), tasks=("math_500",), backend="hf", data_dir=str(data_dir),
        num_samples=3, max_new_tokens=6, batch_size=2, temperature=0.8,
    )  # fmt: skip
    full = evaluate(s, tmp_path / "a", backend=hf_backend, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(s, tmp_path / "b", backend=Interrupting(hf_backend, at=2), show_progress=False)
    assert len(read_lines(tmp_path / "b" / "samples_math_500.jsonl")) == 2 * 3
    resumed = evaluate(s, tmp_path / "b", backend=hf_backend, show_progress=False)

    a = read_lines(tmp_path / "a" / "samples_math_500.jsonl")
    b = read_lines(tmp_path / "b" / "samples_math_500.jsonl")
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert len({r["completion"] for r in a}) > 1  # sampled, not one repeated string
    for key in ("pass@1", "stderr", "n_problems", "n_samples", "extraction_failures"):
        assert resumed["tasks"]["math_500"][key] == full["tasks"]["math_500"][key]


def test_hf_samples_are_seeded(hf_backend):
    prompt = render_prompt(hf_backend.tokenizer, "What is 1 + 2?")
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6)
    first = hf_backend.generate([prompt], sampling, [11])[0]
    assert hf_backend.generate([prompt], sampling, [11])[0] == first
    assert hf_backend.generate([prompt], sampling, [12])[0] != first
    greedy = hf_backend.generate([prompt], Sampling(n=3, temperature=0, max_new_tokens=6), [1])[0]
    assert len(set(greedy.completions)) == 1 and len(greedy.completions) == 3


def test_hf_backend_ignores_the_checkpoint_sampling_defaults(hf_backend):
    config = hf_backend._config(Sampling(n=2, temperature=0.6, top_p=0.95, max_new_tokens=4), greedy=False)
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.6, 0.95, 0, 1.0)
    assert hf_backend.tokenizer.padding_side == "left"


def test_nexus_checkpoint_evaluates(tmp_path, nexus_model_dir, data_dir):
    s = EvalSettings(
        model=str(nexus_model_dir), tasks=("gpqa_diamond",), backend="hf", data_dir=str(data_dir),
        limit=2, num_samples=1, temperature=0, max_new_tokens=5,
    )  # fmt: skip
    results = evaluate(s, tmp_path, show_progress=False)
    assert results["model"]["config"]["model_type"] == "nexus_qwen2"
    assert results["model"]["nexus"]["order"] == 2
    assert results["tasks"]["gpqa_diamond"]["n_problems"] == 2
    assert not results["settings"]["trust_remote_code"]


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(BackendError, match="no chat template.*--no-chat-template"):
        render_prompt(tokenizer, "hi")
    assert render_prompt(tokenizer, "hi", "be brief", use_chat_template=False) == "be brief\n\nhi"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_samples_do_not_depend_on_batching(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """One engine, two runs: all problems in one generate call vs one problem per call give the
    same samples, because every problem carries its own seed."""
    pytest.importorskip("vllm")
    from nexus_retrofit.evaluation.backends import VLLMBackend

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no 30 s respawn
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    backend = VLLMBackend(
        str(tiny_model_dir),
        dtype="float32",
        seed=0,
        enforce_eager=True,
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
    )
    try:
        common = dict(
            model=str(tiny_model_dir),
            tasks=("math_500",),
            data_dir=str(data_dir),
            limit=3,
            num_samples=2,
            max_new_tokens=4,
        )
        one_call = evaluate(
            EvalSettings(backend="vllm", **common), tmp_path / "a", backend=backend, show_progress=False
        )
        per_problem = evaluate(
            EvalSettings(backend="vllm", batch_size=1, **common),
            tmp_path / "b",
            backend=backend,
            show_progress=False,
        )
    finally:
        backend.close()
    a = read_lines(tmp_path / "a" / "samples_math_500.jsonl")
    b = read_lines(tmp_path / "b" / "samples_math_500.jsonl")
    assert len(a) == 6 and [r["completion"] for r in a] == [r["completion"] for r in b]
    assert all(1 <= r["num_tokens"] <= 4 for r in a)
    assert one_call["settings"]["batch_size"] is None and one_call["tasks"]["math_500"]["n_samples"] == 2
    assert per_problem["tasks"]["math_500"]["pass@1"] == one_call["tasks"]["math_500"]["pass@1"]
