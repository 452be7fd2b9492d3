"""A GPU check in one call (`nexus-retrofit bench gpu`): kernel parity, training and serving speed.

Parts, in order, each time-boxed and recorded (a failure is a row in the report, never a crash):
- parity: every inner kind (separate/shared/self, order 2, qk) and the base model as control, in bf16
  with SDPA and FlashAttention-2 (when flash_attn imports) against an fp32 eager reference, on
  left-padded batches and on packed (varlen) rows: position_ids restart per document, no mask.
- sft: SFT step tokens/s and peak memory, base vs Nexus, at the Qwen2.5-0.5B shape and 4k context
  (random weights, a few steps); with liger-kernel importable, both arms again with Liger.
- speed: `bench speed --device cuda` (nexus_retrofit.bench.speed) with fewer repeats and decode tokens,
  so it fits the budget; its own JSON/markdown/PNG go to <output>/speed.
- vllm: greedy parity of vLLM with HF and decode tokens/s, Nexus vs base (when vllm imports).

`--dry-run` runs the same code at tiny shapes on the CPU in seconds (vLLM skipped with its reason): CI
runs it, so the first GPU run spends its minutes measuring. On a GPU each part runs in a subprocess
that is killed at its time box (a hung kernel or a poisoned CUDA context cannot take the rest down);
rows recorded before that are kept.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..modeling import NexusConfig
from ..safe_output import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PARTS = ("parity", "sft", "speed", "vllm")
# Seconds per part on a GPU (H200: measured parts take well under these); the whole run stays <= 10 min.
BUDGET_S = {"parity": 90, "sft": 150, "speed": 180, "vllm": 150}
TOTAL_S = 560
INNER_KINDS = ("separate", "shared", "self")
PARITY_TOL = 0.05  # relative Frobenius error of bf16 logits vs the fp32 eager reference
VLLM_MIN_MATCH = 0.5  # fraction of greedy tokens before the first divergence, averaged over prompts

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_SMALL.update(num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
# head_dim 64 on a GPU: the size FlashAttention and vLLM's backends are tuned for
_PARITY_GPU = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)
_PARITY_GPU.update(
    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False
)


@dataclass
class Settings:
    """What to run where: `small` is the dry run's tiny shapes (also usable on a GPU, as tests/gpu does)."""

    device: str = "cuda"
    small: bool = False
    vllm: bool = True
    out_dir: str = "runs/gpu_check"  # the speed part writes its own report under <out_dir>/speed

    @property
    def parity_config(self) -> dict:
        return _SMALL if self.small else _PARITY_GPU

    @property
    def pad_lengths(self) -> tuple[int, ...]:
        return (24, 13) if self.small else (512, 301)

    @property
    def doc_lengths(self) -> tuple[int, ...]:
        return (9, 7, 12) if self.small else (200, 137, 300, 64)


@dataclass
class PartResult:
    part: str
    status: str = "running"  # ok, failed (a check did not hold), error, timeout, skipped
    seconds: float = 0.0
    note: str = ""
    rows: list[dict] = field(default_factory=list)


class PartTimeout(Exception):
    pass


class Context:
    """What a part gets: settings, a deadline, and `add(row)` that records a row at once."""

    def __init__(self, result: PartResult, settings: Settings, deadline: float, sink: Path | None = None):
        self.result, self.settings, self.deadline, self.sink = result, settings, deadline, sink

    def add(self, **row: Any) -> None:
        self.result.rows.append(row)
        self.save()

    def save(self) -> None:
        if self.sink is not None:
            atomic_write_text(self.sink, json.dumps(asdict(self.result)))

    def check_time(self) -> None:
        """Between items: stop a part that has used its time box (in-process runs)."""
        if time.monotonic() > self.deadline:
            raise PartTimeout()


# --------------------------------------------------------------------------------------- models
def _cuda(settings: Settings) -> bool:
    return settings.device == "cuda"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(
    nexus: NexusConfig | None, config: dict, device: str, dtype: torch.dtype, attn: str = "eager"
) -> PreTrainedModel:
    """A random model (converted when `nexus` is given) whose Nexus paths all contribute.

    The default conversions start function-preserving (zero gates or a zero inner o_proj): every
    inner bug would hide. Gates are set to 0.1 and the inner weights perturbed.
    """
    from .speed import build_model

    model = build_model(nexus, config, "cpu", torch.float32, attn)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if ".self_attn.inner." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device=device, dtype=dtype)


def _with_attn(model: PreTrainedModel, attn: str) -> PreTrainedModel:
    try:
        model.set_attn_implementation(attn)
    except (AttributeError, TypeError):  # an older API: the attention modules read the config
        model.config._attn_implementation = attn
    return model


def _variants() -> list[tuple[str, NexusConfig | None]]:
    return [("base", None)] + [(f"{k}-qk-m2", NexusConfig(order=2, inner=k)) for k in INNER_KINDS]


# --------------------------------------------------------------------------------------- parity
def _rel_error(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error and top-1 agreement of logits (rows = positions)."""
    c, r = candidate.float(), reference.float()
    rel = ((c - r).norm() / r.norm().clamp_min(1e-12)).item()
    return rel, (c.argmax(-1) == r.argmax(-1)).float().mean().item()


def _left_padded(settings: Settings, vocab: int, device: str) -> dict[str, torch.Tensor]:
    lengths = settings.pad_lengths
    n = max(lengths)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, n - length :] = 1
    ids = ids * mask  # pad id 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return {
        k: v.to(device)
        for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=position_ids).items()
    }


def _packed(
    settings: Settings, vocab: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One row of documents back to back, position_ids restarting at each (TRL's padding-free packing)."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, vocab, (1, n), generator=g).to(device) for n in settings.doc_lengths]
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None].to(device)
    return torch.cat(docs, dim=1), position_ids, docs


@torch.no_grad()
def _parity_errors(
    reference: PreTrainedModel, candidate: PreTrainedModel, settings: Settings
) -> dict[str, tuple[float, float]]:
    """{input kind: (relative error, top-1 agreement)} of the candidate against the fp32 reference."""
    device, vocab = settings.device, reference.config.vocab_size
    padded = _left_padded(settings, vocab, device)
    keep = padded["attention_mask"].bool()
    ref = reference(**padded).logits[keep]
    out = {"left_padded": _rel_error(candidate(**padded).logits[keep], ref)}
    ids, position_ids, docs = _packed(settings, vocab, device)
    ref = torch.cat([reference(input_ids=d).logits[0] for d in docs])  # each document on its own
    # use_cache=False as in training: transformers reads document boundaries from position_ids only
    # when no cache is passed (with one it assumes a single sequence and the documents see each other)
    packed = candidate(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
    out["packed"] = _rel_error(packed, ref)
    return out


def _parity_attns(settings: Settings, ctx: Context) -> list[str]:
    attns = ["sdpa"]
    if not _cuda(settings):
        ctx.add(attn="flash_attention_2", status="skipped", reason="FlashAttention-2 needs a CUDA device")
    elif importlib.util.find_spec("flash_attn") is None:
        ctx.add(attn="flash_attention_2", status="skipped", reason="flash_attn is not importable")
    else:
        attns.append("flash_attention_2")
    return attns


def part_parity(ctx: Context) -> None:
    settings = ctx.settings
    attns = _parity_attns(settings, ctx)
    for label, nexus in _variants():
        ctx.check_time()
        reference = build(nexus, settings.parity_config, settings.device, torch.float32, "eager").eval()
        for attn in attns:
            candidate = _with_attn(copy.deepcopy(reference).to(torch.bfloat16), attn)
            try:
                errors = _parity_errors(reference, candidate, settings)
            except Exception as e:  # one kernel failing must not hide the others
                ctx.add(variant=label, attn=attn, status="error", reason=f"{type(e).__name__}: {e}"[:300])
                continue
            finally:
                del candidate
            for inputs, (rel, top1) in errors.items():
                ok = rel <= PARITY_TOL
                ctx.add(
                    variant=label,
                    attn=attn,
                    inputs=inputs,
                    rel_error=round(rel, 5),
                    top1_agree=round(top1, 4),
                    status="ok" if ok else "failed",
                )
        del reference
        _free(settings.device)


# ------------------------------------------------------------------------------------------ sft
def _sft_shape(settings: Settings) -> tuple[dict, int, int, int, int]:
    """(model config, sequence length, batch, warm-up steps, timed steps)."""
    from .shapes import QWEN_05B_CONFIG

    if settings.small:
        return _SMALL, 32, 2, 1, 2
    return {**QWEN_05B_CONFIG, "max_position_embeddings": 8192}, 4096, 1, 2, 4


def _train_attn(settings: Settings) -> str:
    if _cuda(settings) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _sft_measure(
    model: PreTrainedModel, ids: torch.Tensor, warmup: int, steps: int, device: str
) -> tuple[float, float | None]:
    """(tokens/s, peak MiB above the model's resting memory) of AdamW SFT steps on `ids`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - resting) / 2**20 if device == "cuda" else None
    return ids.numel() * steps / seconds, peak


def _liger_arms(settings: Settings, ctx: Context) -> bool:
    if not _cuda(settings):
        ctx.add(variant="liger", status="skipped", reason="Liger's Triton kernels need a CUDA device")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        ctx.add(variant="liger", status="skipped", reason="liger_kernel is not importable")
        return False
    return True


def part_sft(ctx: Context) -> None:
    settings = ctx.settings
    config, seq_len, batch, warmup, steps = _sft_shape(settings)
    dtype = torch.bfloat16 if _cuda(settings) else torch.float32
    attn = _train_attn(settings)
    ids = torch.randint(1, config["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(4))
    ids = ids.to(settings.device)
    arms: list[tuple[str, NexusConfig | None, bool]] = [(label, nx, False) for label, nx in _variants()]
    if _liger_arms(settings, ctx):  # last: Liger swaps module-level functions for every later model
        arms += [("base+liger", None, True), ("separate-qk-m2+liger", NexusConfig(order=2), True)]
    base_rate: dict[bool, float] = {}
    for label, nexus, use_liger in arms:
        ctx.check_time()
        try:
            model = build(nexus, config, settings.device, dtype, attn)
            if use_liger:
                _apply_liger(model)
            rate, peak = _sft_measure(model, ids, warmup, steps, settings.device)
        except Exception as e:
            ctx.add(variant=label, attn=attn, status="error", reason=f"{type(e).__name__}: {e}"[:300])
            continue
        finally:
            model = None
            _free(settings.device)
        base_rate.setdefault(use_liger, rate)
        ctx.add(
            variant=label,
            attn=attn,
            dtype=str(dtype).removeprefix("torch."),
            seq_len=seq_len,
            batch=batch,
            tokens_per_s=round(rate, 1),
            vs_base=round(rate / base_rate[use_liger], 3),
            peak_mib=None if peak is None else round(peak),
            status="ok",
        )


def _apply_liger(model: PreTrainedModel) -> None:
    """As TRL's SFTTrainer does: the Trainer's Liger call, without fused linear cross-entropy."""
    from transformers.integrations.liger import apply_liger_kernel

    from ..train.liger import register_liger

    register_liger()
    apply_liger_kernel(model, {"fused_linear_cross_entropy": False})


# ---------------------------------------------------------------------------------------- speed
def part_speed(ctx: Context) -> None:
    """`bench speed` on this device, sized to the budget; rows summarise, <output>/speed has the rest."""
    from . import speed
    from .shapes import QWEN_05B_CONFIG

    settings = ctx.settings
    device = settings.device
    dtype = torch.bfloat16 if _cuda(settings) else torch.float32
    if settings.small:
        lens, layer_cfg, model_cfg = [32], {k: _SMALL[k] for k in speed.LAYER_CONFIG}, _SMALL
        lengths = dict(train_len=16, prompt_len=4, new_tokens=2, train_batch=1)
    else:
        lens, layer_cfg, model_cfg = [1024, 4096, 16384], speed.LAYER_CONFIG, QWEN_05B_CONFIG
        lengths = dict(train_len=2048, prompt_len=128, new_tokens=32, train_batch=8)
    layer = speed.bench_layer(
        lens, device, dtype, "sdpa", repeats=1 if settings.small else 2, layer_config=layer_cfg
    )
    for r in layer:
        ctx.add(
            kind="layer",
            variant=r.variant,
            seq_len=r.seq_len,
            train_ratio=round(r.train_ratio, 3),
            status="ok",
        )
    ctx.check_time()
    model = speed.bench_model(model_cfg, device, dtype, "sdpa", repeats=1 if settings.small else 2, **lengths)
    for r in model:
        ctx.add(
            kind="model",
            variant=r.variant,
            sft_vs_base=round(r.train_vs_base, 3),
            decode_b1_vs_base=round(r.decode_b1_vs_base, 3),
            decode_b32_vs_base=round(r.decode_b32_vs_base, 3),
            status="ok",
        )
    payload = {
        "environment": speed.environment(device),
        "settings": {"seq_lens": lens, "dtype": str(dtype), "attn_implementation": "sdpa", **lengths},
        "layer": [asdict(r) for r in layer],
        "model": [asdict(r) for r in model],
    }
    out = Path(settings.out_dir) / "speed"
    ctx.result.note = f"report: {speed.write_report(out, payload, layer, model)}"


# ----------------------------------------------------------------------------------------- vllm
def _vllm_checkpoints(folder: Path, config: dict) -> dict[str, Path]:
    """A random base checkpoint and its Nexus conversion, sharpened so greedy decoding has few ties."""
    paths = {}
    for label, nexus in [("base", None), ("separate-qk-m2", NexusConfig(order=2))]:
        model = build(nexus, config, "cpu", torch.float32)
        with torch.no_grad():  # a random model's logits are near-uniform: scale them up
            model.model.norm.weight.mul_(8.0)
        model.generation_config.pad_token_id = 0
        model.to(torch.bfloat16).save_pretrained(folder / label)
        paths[label] = folder / label
    return paths


def _hf_greedy(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            outs.append(out[0, len(p) :].tolist())
    del model
    _free("cuda")
    return outs


def _matched_fraction(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def _vllm_run(
    path: Path, prompts: list[list[int]], new_tokens: int, batch: int
) -> tuple[list[list[int]], float]:
    """(greedy tokens of `prompts`, decode tokens/s of `batch` prompts) from one engine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(path),
        dtype="bfloat16",
        skip_tokenizer_init=True,
        enforce_eager=True,  # CUDA-graph capture would take most of this part's budget per engine
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    many = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
    start = time.perf_counter()
    llm.generate(many, params, use_tqdm=False)
    rate = batch * new_tokens / (time.perf_counter() - start)
    del llm
    _free("cuda")
    return greedy, rate


def part_vllm(ctx: Context) -> None:
    from .shapes import QWEN_05B_CONFIG

    settings = ctx.settings
    if not settings.vllm:
        ctx.result.status, ctx.result.note = "skipped", "dry run: no vLLM engine is started"
        return
    if not _cuda(settings) or importlib.util.find_spec("vllm") is None:
        ctx.result.status = "skipped"
        ctx.result.note = "vllm is not importable" if _cuda(settings) else "vLLM on a GPU only here"
        return
    new_tokens, g = 32, torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in (16, 64, 200, 400)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = _vllm_checkpoints(Path(tmp), QWEN_05B_CONFIG)
        rates, matches = {}, {}
        for label, path in paths.items():
            ctx.check_time()
            reference = _hf_greedy(path, prompts, new_tokens)
            greedy, rates[label] = _vllm_run(path, prompts, new_tokens, batch=64)
            matches[label] = sum(map(_matched_fraction, greedy, reference)) / len(prompts)
            floor = min(VLLM_MIN_MATCH, matches.get("base", 1.0) - 0.25)
            ctx.add(
                variant=label,
                greedy_match=round(matches[label], 3),
                decode_tokens_per_s_b64=round(rates[label], 1),
                vs_base=round(rates[label] / rates["base"], 3),
                status="ok" if matches[label] >= floor else "failed",
            )


PART_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "parity": part_parity,
    "sft": part_sft,
    "speed": part_speed,
    "vllm": part_vllm,
}


# --------------------------------------------------------------------------------------- runner
def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _finish(result: PartResult, started: float) -> PartResult:
    result.seconds = round(time.monotonic() - started, 1)
    if result.status == "running":
        bad = [r for r in result.rows if r.get("status") in ("failed", "error")]
        result.status = "failed" if bad else "ok"
    return result


def run_part(name: str, settings: Settings, budget_s: float, sink: Path | None = None) -> PartResult:
    """One part in this process; exceptions and time-outs become its status."""
    result, started = PartResult(name), time.monotonic()
    ctx = Context(result, settings, started + budget_s, sink)
    try:
        PART_FUNCTIONS[name](ctx)
    except PartTimeout:
        result.status, result.note = "timeout", f"stopped after its {budget_s:.0f} s time box"
    except Exception as e:
        result.status = "error"
        result.note = "".join(traceback.format_exception_only(type(e), e)).strip()[:500]
    _finish(result, started)
    ctx.save()
    return result


def run_isolated(command: list[str], sink: Path, name: str, timeout_s: float) -> PartResult:
    """Run `command` (which writes its PartResult to `sink` as it goes), killed after `timeout_s`."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: vLLM's engine processes go too
        output, _ = proc.communicate()
        timed_out = True
    result = PartResult(name)
    if sink.exists():
        result = PartResult(**json.loads(sink.read_text()))
    tail = output.decode(errors="replace")[-1500:]
    if timed_out:
        result.status, result.note = "timeout", f"killed after its {timeout_s:.0f} s time box"
    elif proc.returncode != 0 or result.status == "running":
        result.status, result.note = "error", f"exit code {proc.returncode}: {tail}"
    result.seconds = round(time.monotonic() - started, 1)
    return result


def environment(settings: Settings) -> dict:
    import transformers

    env = {
        "device": settings.device,
        "small": settings.small,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for package in ("flash_attn", "liger_kernel", "vllm"):
        env[package] = importlib.util.find_spec(package) is not None
    if settings.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_gpu_check(
    out_dir: Path,
    settings: Settings,
    parts: tuple[str, ...] = PARTS,
    isolate: bool | None = None,
    total_s: float = TOTAL_S,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the parts within `total_s`, write gpu_check.json and gpu_check.md; return the markdown path."""
    isolate = _cuda(settings) if isolate is None else isolate
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, out_dir=str(out_dir.resolve()))
    end = time.monotonic() + total_s
    results = []
    for name in parts:
        budget = min(BUDGET_S[name], end - time.monotonic())
        if budget < 5:
            results.append(PartResult(name, "timeout", 0.0, "no time left of the whole run's budget"))
            continue
        log(f"{name}: up to {budget:.0f} s ...")
        if isolate:
            sink = out_dir / f".part_{name}.json"
            sink.unlink(missing_ok=True)
            command = [
                sys.executable,
                "-m",
                __name__,
                "--part",
                name,
                "--sink",
                str(sink),
                "--budget-s",
                str(budget),
            ]
            command += ["--device", settings.device, "--output-dir", settings.out_dir]
            command += ["--small"] if settings.small else []
            command += [] if settings.vllm else ["--no-vllm"]
            result = run_isolated(command, sink, name, budget + 30)  # + start-up and a last write
            sink.unlink(missing_ok=True)
        else:
            result = run_part(name, settings, budget)
        log(f"{name}: {result.status} in {result.seconds} s {result.note[:200]}")
        results.append(result)
    return write_report(out_dir, environment(settings), results)


# --------------------------------------------------------------------------------------- report
def _table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def write_report(out_dir: Path, env: dict, results: list[PartResult]) -> Path:
    payload = {"environment": env, "parts": [asdict(r) for r in results]}
    md = ["# Nexus GPU check", "", f"`{json.dumps(env)}`", ""]
    md += _table(
        [{"part": r.part, "status": r.status, "seconds": r.seconds, "note": r.note[:200]} for r in results]
    )
    for r in results:
        if r.rows:
            md += ["", f"## {r.part}", ""] + _table(r.rows)
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(payload, indent=2))
    atomic_write_text(out_dir / "gpu_check.md", "\n".join(md).replace("\n\n\n", "\n\n") + "\n")
    return out_dir / "gpu_check.md"


def main(argv: list[str] | None = None) -> int:
    """`python -m nexus_retrofit.bench.gpu_check`: the whole check, or one part (the isolated runner's child)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no vLLM")
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--sink", type=Path)
    parser.add_argument("--budget-s", type=float, default=TOTAL_S)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args(argv)
    if args.part:
        settings = Settings(args.device, args.small, not args.no_vllm, str(args.output_dir))
        result = run_part(args.part, settings, args.budget_s, args.sink)
        return 0 if result.status != "running" else 1
    settings = Settings("cpu", True, False) if args.dry_run else Settings()
    report = run_gpu_check(args.output_dir, settings, total_s=args.budget_s)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
