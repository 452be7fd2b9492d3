"""Demo-scale retrofit study: which Nexus mechanics engage on the shipped tiny model.

Every arm is the product's path end to end: `nexus-retrofit train` (TRL SFTTrainer) on the demo's SFT
data with the demo's recipe, the base model converted on the fly from the recipe's `nexus:` block
(`convert` + the real attention classes). Per arm it reports the path strength the trainer logs
(||f(g_p) Inner_p(X)|| / ||X||, mean over layers), |f(g)|, the final loss, greedy accuracy on
held-out problems, and the share of greedy completions that differ from the baseline's.

    python -m nexus_retrofit.experiments.retrofit_demo --steps 200 --eval 200 --arms baseline zero open

`--seed` sets the recipe's seed (data order, dropout-free training noise, and the random inner weights
the conversion draws); the demo's recipe uses 0. Each arm is compared with the baseline of the same
run problem by problem (paired accuracy difference and its standard error, as the demo reports).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Arms: name -> the recipe's nexus block (None: the baseline, plain SFT of the base model).
ARMS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "zero": {"gate": "zero", "inner_init": "random", "gate_lr_multiplier": 1.0},  # the old default
    "zero-gate-lr100": {"gate": "zero", "inner_init": "random", "gate_lr_multiplier": 100.0},
    "zero-all-lr100": {"gate": "zero", "inner_init": "random", "inner_lr_multiplier": 100.0},
    "open-zero_out": {"gate": "open", "inner_init": "zero_out", "gate_lr_multiplier": 1.0},
    "open-zero_out-lr10": {"gate": "open", "inner_init": "zero_out", "inner_lr_multiplier": 10.0},
    # Inner modules only (the gates keep their own x1 group): a multiplier on every new parameter, gates
    # included, made the path explode in the 1-layer study.
    **{
        f"open-zero_out-inner{m}": {
            "gate": "open",
            "inner_init": "zero_out",
            "inner_lr_multiplier": float(m),
            "gate_lr_multiplier": 1.0,
        }
        for m in (3, 10, 30)
    },
    "open-random": {"gate": "open", "inner_init": "random", "gate_lr_multiplier": 1.0},
    "zero-scalar-lr100": {
        "gate": "zero",
        "inner_init": "random",
        "gate_shape": "scalar",
        "gate_lr_multiplier": 100.0,
    },
    "zero-head-lr100": {
        "gate": "zero",
        "inner_init": "random",
        "gate_shape": "head",
        "gate_lr_multiplier": 100.0,
    },
    "zero-tanh-lr100": {
        "gate": "zero",
        "inner_init": "random",
        "gate_fn": "tanh",
        "gate_lr_multiplier": 100.0,
    },
    "open-zero_out-scalar": {"gate": "open", "inner_init": "zero_out", "gate_shape": "scalar"},
    "open-zero_out-head": {"gate": "open", "inner_init": "zero_out", "gate_shape": "head"},
    "default": {},  # NexusConfig's defaults
}


def _recipe(name: str, block: dict[str, Any] | None, steps: int, out: Path, seed: int = 0) -> dict[str, Any]:
    from ..demo.assets import tiny_model_path
    from ..demo.pipeline import RECIPE

    recipe = {
        **RECIPE,
        "use_cpu": True,
        "max_steps": steps,
        "logging_steps": max(1, min(RECIPE["logging_steps"], steps // 10)),
        "model_name_or_path": str(tiny_model_path()),
        "output_dir": str(out / name),
        "dtype": "float32",
        "seed": seed,
    }
    recipe["dataset_name"] = str(_sft_prompt_completion(out))
    if block is not None:
        recipe["nexus"] = {"order": 2, "projections": "qk", "inner": "separate", **block}
    return recipe


def _sft_prompt_completion(out: Path) -> Path:
    """The demo's SFT rows as prompt/completion (completion-only loss), as the demo writes them."""
    from ..demo.arithmetic import read_jsonl, write_jsonl
    from ..demo.assets import sft_data_path

    path = out / "data" / "sft.jsonl"
    if not path.exists():
        rows = [
            {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
            for r in read_jsonl(sft_data_path())
        ]
        write_jsonl(rows, path)
    return path


def _eval_rows(limit: int) -> list[dict]:
    from ..demo.arithmetic import read_jsonl
    from ..demo.assets import eval_data_path

    rows = read_jsonl(eval_data_path())
    half = limit // 2
    return [r for r in rows if int(r["level"]) == 1][:half] + [r for r in rows if int(r["level"]) == 2][:half]


def run_arm(
    name: str, block: dict[str, Any] | None, steps: int, rows: list[dict], out: Path, seed: int = 0
) -> dict[str, Any]:
    """Train one arm through run_training; score its greedy completions on `rows`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..demo.scoring import greedy_completions, is_correct
    from ..train import run_training

    started = time.perf_counter()
    result = run_training(_recipe(name, block, steps, out, seed))
    logged = [e for e in result.log_history if "loss" in e]
    model = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    completions = greedy_completions(model, tokenizer, [r["problem"] for r in rows])
    correct = [is_correct(c, r["answer"]) for c, r in zip(completions, rows)]
    levels = sorted({int(r["level"]) for r in rows})
    last = logged[-1] if logged else {}
    accuracy = {
        lv: sum(c for c, r in zip(correct, rows) if int(r["level"]) == lv)
        / sum(int(r["level"]) == lv for r in rows)
        for lv in levels
    }
    return {
        "arm": name,
        "seed": seed,
        "nexus": result.nexus,
        "final_loss": last.get("loss"),
        "path": {k[len("nexus_path_") :]: v for k, v in last.items() if k.startswith("nexus_path_")},
        "path_curve": [(e["step"], e.get("nexus_path_q"), e.get("nexus_path_k")) for e in logged],
        "gate_abs_mean": last.get("nexus_gate_abs_mean"),
        "accuracy": accuracy,
        "stderr": {
            lv: binomial_stderr(accuracy[lv], sum(int(r["level"]) == lv for r in rows)) for lv in levels
        },
        "levels": [int(r["level"]) for r in rows],
        "correct": correct,
        "completions": completions,
        "seconds": round(time.perf_counter() - started, 1),
    }


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a pass rate p measured on n independent problems."""
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each arm's share of completions that differ from the baseline's, and the paired accuracy
    difference from the baseline (all problems and per level), with its standard error."""
    from ..demo.scoring import paired_comparison

    base = next((r for r in results if r["arm"] == "baseline"), None)
    if base is None:
        return results
    for r in results:
        pairs = list(zip(r["completions"], base["completions"]))
        r["differ_from_baseline"] = sum(a != b for a, b in pairs) / len(pairs)
        r["differ_count"] = sum(a != b for a, b in pairs)
        records = [
            [{"completion": c, "correct": ok} for c, ok in zip(x["completions"], x["correct"])]
            for x in (base, r)
        ]
        groups = {"all": range(len(pairs)), **{str(lv): [] for lv in sorted(set(r["levels"]))}}
        for i, lv in enumerate(r["levels"]):
            groups[str(lv)].append(i)
        r["paired"] = {}
        for group, index in groups.items():
            c = paired_comparison([records[0][i] for i in index], [records[1][i] for i in index])
            r["paired"][group] = {
                "differ": c["differ"],
                "difference": c["difference"],
                "stderr": c["difference_stderr"],
            }
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | path q | path k | mean abs f(g) | final loss | acc 1-step | acc 2-step | differ from baseline "
        "| s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc, err = r["accuracy"], r.get("stderr", {})
        path = r["path"]
        lines.append(
            f"| {r['arm']} | {path.get('q', '-') if path else '-'} | {path.get('k', '-') if path else '-'} | "
            f"{r['gate_abs_mean'] if r['gate_abs_mean'] is not None else '-'} | {r['final_loss']:.4f} | "
            f"{acc.get(1, 0):.3f} ± {err.get(1, 0):.3f} | {acc.get(2, 0):.3f} ± {err.get(2, 0):.3f} | "
            f"{r.get('differ_count', 0)} ({r.get('differ_from_baseline', 0):.3f}) | {r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval", type=int, default=200, help="held-out problems (half 1-step, half 2-step)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed (the demo's: 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = _eval_rows(args.eval)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arms:
            results.append(run_arm(name, ARMS[name], args.steps, rows, Path(tmp), args.seed))
            print(f"{name}: path {results[-1]['path']} acc {results[-1]['accuracy']}", flush=True)
            if args.json:  # after every arm: a long run killed midway keeps what it measured
                _write(args.json, compare(results))
    compare(results)
    print(table(results))
    if args.json:
        _write(args.json, results)


def _write(path: Path, results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
