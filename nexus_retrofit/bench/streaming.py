"""Peak memory and time of `convert` in memory vs streaming, on a synthetic multi-GB sharded checkpoint.

    python -m nexus_retrofit.bench.streaming [--output-dir runs/perf] [--layers 28] [--shard-gib 1]
    nexus-retrofit bench streaming            (the same)

The checkpoint has the Qwen2.5-1.5B shape (3.1 GB in bf16) with random weights, written shard by
shard with safetensors (never the whole model in memory). Each conversion runs in a fresh
subprocess (`nexus-retrofit convert`), measured by its own peak RSS (VmHWM, read at exit) and wall
time. The two outputs are then compared tensor by tensor.
Criterion (issue: "peak memory within 1.5x of its largest shard plus the new parameters"):
streaming peak RSS <= 1.5 x (largest source shard + new parameters' bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# Qwen2.5-1.5B (config.json on the Hub), tied embeddings, bf16
SHAPE = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
GIB = 2**30


def write_synthetic_checkpoint(folder: Path, layers: int, shard_bytes: int, seed: int = 0) -> list[int]:
    """A sharded bf16 Qwen2 checkpoint with random weights; returns the shard sizes in bytes.

    Tensor names and shapes come from the model built on the meta device; each shard's tensors are
    generated, written and freed before the next, so memory peaks at one shard."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = Qwen2Config(**SHAPE, num_hidden_layers=layers, dtype="bfloat16")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    specs = {n: t.shape for n, t in remove_tied_weights_from_state_dict(model.state_dict(), model).items()}
    plan = _shard_plan(specs, shard_bytes)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for i, names in enumerate(plan, start=1):
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {n: (torch.randn(specs[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        sizes.append(sum(t.nbytes for t in shard.values()))
        weight_map.update(dict.fromkeys(names, file))
        del shard
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    return sizes


def _shard_plan(specs: dict[str, torch.Size], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in specs.items():
        nbytes = shape.numel() * 2  # bf16
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


# Run in the measured process: at exit, record its VmHWM (peak RSS of this process's own memory since
# exec). wait4's ru_maxrss would not do: Linux carries the forking parent's peak into the child's.
_PROBE = """
import atexit, sys
def _peak(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as f:
        f.write(kib)
atexit.register(_peak)
sys.argv = sys.argv[2:]
"""
RUN_CLI = "import runpy; runpy.run_module('nexus_retrofit.cli', run_name='__main__', alter_sys=True)"
IMPORTS_ONLY = "import torch, transformers, nexus_retrofit.modeling"


def measure(body: str, args: list[str], probe_file: Path) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `python -c body args` in a fresh process; fails if it fails."""
    command = [sys.executable, "-c", _PROBE + body, str(probe_file), "nexus-retrofit", *args]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return int(probe_file.read_text()) * 1024, wall


def same_tensors(a: Path, b: Path) -> bool:
    """Both folders hold the same tensor names with equal values (read one tensor at a time)."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    fa, fb = files(a), files(b)
    if sorted(fa) != sorted(fb):
        return False
    for name in fa:
        with safe_open(str(fa[name]), framework="pt") as x, safe_open(str(fb[name]), framework="pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def run_streaming_bench(output_dir: Path, layers: int = 28, shard_gib: float = 1.0) -> Path:
    """Build the checkpoint, convert it both ways, write streaming.json and streaming.md."""
    work = output_dir / f".streaming-work-{os.getpid()}"
    source, probe = work / "source", work / "peak_kib"
    try:
        start = time.perf_counter()
        shard_sizes = write_synthetic_checkpoint(source, layers, int(shard_gib * GIB))
        build_s = time.perf_counter() - start
        baseline = measure(IMPORTS_ONLY, [], probe)
        in_memory = measure(
            RUN_CLI, ["convert", str(source), str(work / "in_memory"), "--no-streaming"], probe
        )
        streamed = measure(RUN_CLI, ["convert", str(source), str(work / "streaming"), "--streaming"], probe)
        new_bytes = sum(f.stat().st_size for f in (work / "streaming").glob("model-nexus-*.safetensors"))
        identical = same_tensors(work / "in_memory", work / "streaming")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bound = 1.5 * (max(shard_sizes) + new_bytes)
    report = {
        "checkpoint": {
            "shape": "Qwen2.5-1.5B",
            "layers": layers,
            "dtype": "bfloat16",
            "source_bytes": sum(shard_sizes),
            "shards": len(shard_sizes),
            "largest_shard_bytes": max(shard_sizes),
            "new_parameter_bytes": new_bytes,
            "build_s": round(build_s, 1),
        },
        "import_only": {"peak_rss_bytes": baseline[0], "wall_s": round(baseline[1], 1)},
        "in_memory": {"peak_rss_bytes": in_memory[0], "wall_s": round(in_memory[1], 1)},
        "streaming": {"peak_rss_bytes": streamed[0], "wall_s": round(streamed[1], 1)},
        "bound_bytes": bound,
        "streaming_within_bound": streamed[0] <= bound,
        "identical_tensors": identical,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "streaming.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = output_dir / "streaming.md"
    markdown.write_text(_markdown(report))
    return markdown


def _markdown(r: dict) -> str:
    c = r["checkpoint"]
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    mem, stream = r["in_memory"], r["streaming"]
    lines = [
        f"Synthetic {c['shape']}-shaped checkpoint, {c['layers']} layers, {c['dtype']}: {gb(c['source_bytes'])} "
        f"in {c['shards']} shards (largest {gb(c['largest_shard_bytes'])}); new parameters "
        f"{gb(c['new_parameter_bytes'])} (default settings). {r['cpus']} CPUs, torch {r['torch']}.",
        "",
        "| convert | peak RSS | wall time |",
        "|---|---|---|",
        f"| in memory (`--no-streaming`) | {gb(mem['peak_rss_bytes'])} | {mem['wall_s']:.1f} s |",
        f"| streaming (`--streaming`) | {gb(stream['peak_rss_bytes'])} | {stream['wall_s']:.1f} s |",
        f"| streaming / in memory | {stream['peak_rss_bytes'] / mem['peak_rss_bytes']:.2f}x | "
        f"{stream['wall_s'] / mem['wall_s']:.2f}x |",
        f"| (python + torch + transformers imports only) | {gb(r['import_only']['peak_rss_bytes'])} | "
        f"{r['import_only']['wall_s']:.1f} s |",
        "",
        f"Criterion: streaming peak <= 1.5 x (largest shard + new parameters) = {gb(r['bound_bytes'])}: "
        f"{'met' if r['streaming_within_bound'] else 'NOT met'}. "
        f"Same tensors as the in-memory output: {'yes' if r['identical_tensors'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/perf"))
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--shard-gib", type=float, default=1.0)
    args = parser.parse_args()
    print(run_streaming_bench(args.output_dir, args.layers, args.shard_gib).read_text())


if __name__ == "__main__":
    main()
