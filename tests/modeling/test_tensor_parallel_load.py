"""A 2-process `from_pretrained(..., tp_plan="auto")` load of a Nexus checkpoint gives the one-process logits.

transformers shards what the family's `base_model_tp_plan` names (the layer's own q/k/v colwise, o_proj
rowwise; GPT-NeoX's fused `query_key_value` colwise) as DTensors, and hooks those modules so each rank
computes its block of heads. The Nexus inner modules and gates are in no plan: they must stay whole
(replicated) on every rank, a sharded weight must never enter the fused level-1 matmul (`_fusable`),
and the recursion must produce, on every rank, the logits one process produces.

One launch serves the whole table: torchrun starts 2 CPU ranks (gloo, loopback) running this file as a
script; each loads every checkpoint of the table in turn and writes what it saw. A row whose load or
forward raises is recorded (with its traceback) and the ranks go on to the next row.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
ATOL = 1e-5  # fp32: the sharded matmuls and the all-reduce sum in another order than one process


@dataclass(frozen=True)
class Row:
    family: str
    inner: str
    order: int = 2
    gate_shape: str = "channel"

    @property
    def name(self) -> str:
        extra = "" if self.gate_shape == "channel" else f"-{self.gate_shape}"
        return f"{self.family}-{self.inner}-m{self.order}{extra}"


# Every family with a `base_model_tp_plan` in transformers (all five have one), every inner kind at order
# 2; order 3 and per-head gates where the fix of a sharded path has something more to get right.
FAMILIES = ("qwen2", "llama", "mistral", "qwen3", "gpt_neox")
INNERS = ("separate", "shared", "self", "mlp")
ROWS = [Row(family, inner) for family in FAMILIES for inner in INNERS] + [
    Row("qwen2", "separate", order=3),
    Row("qwen2", "shared", order=3),
    Row("qwen2", "self", order=3),
    Row("qwen2", "separate", gate_shape="head"),  # per-head gates on whole (replicated) inner heads
    Row("qwen2", "shared", gate_shape="head"),  # ... on the layer's own heads, sharded
    Row("qwen2", "self", gate_shape="head"),
    Row("gpt_neox", "self", gate_shape="head"),
]
# Readings that project X through the layer's own (sharded) q/k/v at level 1: `_fusable` must see a DTensor.
READS_OWN_PROJECTIONS_AT_LEVEL_1 = ("shared", "self")


# ------------------------------------------------------------------------------------- the ranks
def _rank_main(folder: Path) -> None:
    """One rank (under torchrun): load every checkpoint in `folder` with tp_plan="auto", record logits,
    which parameters are DTensors, and every `_fusable` answer on a DTensor weight."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import nexus_retrofit.modeling  # noqa: F401  (before from_pretrained: registers the Nexus types with the Auto classes)
    from nexus_retrofit.modeling import modeling_nexus

    fusable = modeling_nexus._fusable
    seen: list[bool] = []  # _fusable's answers for DTensor weights, this row

    def watched(linear: torch.nn.Module) -> bool:
        answer = fusable(linear)
        if modeling_nexus._is_dtensor(linear.weight):
            seen.append(answer)
        return answer

    modeling_nexus._fusable = watched  # looked up at call time by project_all / project_interleaved
    ids = torch.load(folder / "ids.pt")
    results = {}
    for row in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        seen.clear()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder / row, tp_plan="auto", dtype=torch.float32)
            model.eval()
            with torch.no_grad():
                logits = model(ids).logits
            results[row] = {
                "logits": logits.detach().clone(),
                "class": f"{type(model).__module__}.{type(model).__name__}",
                "dtensors": sorted(n for n, p in model.named_parameters() if modeling_nexus._is_dtensor(p)),
                "params": sorted(n for n, _ in model.named_parameters()),
                "fusable_on_dtensor": list(seen),
            }
        except Exception:  # recorded for the test to report; every rank fails alike, so none is left waiting
            results[row] = {"error": traceback.format_exc()}
    torch.save(results, folder / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------- the test
def _launch_ranks(folder: Path) -> tuple[int | None, Path]:
    from tests.train.launch import cpu_env, free_port, launch, launch_timeout

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env = cpu_env(
        PYTHONPATH=os.pathsep.join(paths),  # the ranks run this file as a script: `tests.` from the root
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",  # loopback only
        TRANSFORMERS_VERBOSITY="error",
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(folder),
    ]  # fmt: skip
    log = folder / "torchrun.log"
    return launch(command, env, log, launch_timeout()), log


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict:
    """Every row's checkpoint, its one-process logits, and what each of the 2 ranks saw."""
    from transformers import AutoModelForCausalLM

    from nexus_retrofit import NexusConfig, convert
    from tests.conftest import VOCAB, perturb_nexus, tiny_base_model

    folder = tmp_path_factory.mktemp("tp")
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.save(ids, folder / "ids.pt")
    single = {}
    for row in ROWS:
        torch.manual_seed(0)
        nexus = NexusConfig(order=row.order, inner=row.inner, gate_shape=row.gate_shape)
        # an even vocabulary: transformers 5.16 gathers a colwise lm_head only when the TP size divides it
        model = convert(tiny_base_model(row.family, vocab_size=VOCAB + 1), nexus)
        perturb_nexus(model)  # gates away from 0: with a zero gate the inner path would not show
        model.save_pretrained(folder / row.name)
        loaded = AutoModelForCausalLM.from_pretrained(folder / row.name, dtype=torch.float32).eval()
        with torch.no_grad():
            single[row.name] = loaded(ids).logits
    code, log = _launch_ranks(folder)
    ranks = [
        torch.load(path, weights_only=False) if (path := folder / f"rank{r}.pt").exists() else {}
        for r in range(WORLD_SIZE)
    ]
    return {"single": single, "ranks": ranks, "code": code, "log": log}


def _outer_projection(name: str) -> bool:
    """A parameter of the layer's own q/k/v/o projections (the ones the family's tp plan shards)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] in ("self_attn", "attention") and parts[-2] in (
        "q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense",
    )  # fmt: skip


@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in ROWS])
def test_two_rank_tp_load_gives_the_single_process_logits(table, row):
    tail = table["log"].read_text()[-3000:] if table["log"].exists() else ""
    seen = [ranks.get(row.name) for ranks in table["ranks"]]
    assert all(s is not None for s in seen), (
        f"torchrun exit {table['code']}, no result for {row.name}:\n{tail}"
    )
    errors = [s["error"] for s in seen if "error" in s]
    if errors:  # the traceback's end: where in the Nexus forward the sharded heads met whole ones
        pytest.fail(f"{row.name} under tp_plan='auto' raised:\n" + "\n".join(errors[0].splitlines()[-12:]))
    want = table["single"][row.name]
    for rank, got in enumerate(seen):
        assert got["class"].startswith("nexus_retrofit.modeling.modeling_nexus."), got["class"]
        nexus = [n for n in got["params"] if ".inner." in n or ".gates." in n]
        assert nexus, "the checkpoint holds Nexus parameters"
        assert not set(nexus) & set(got["dtensors"]), "Nexus inner modules and gates stay replicated"
        sharded = [n for n in got["params"] if _outer_projection(n) and n.endswith("weight")]
        assert sharded and set(sharded) <= set(got["dtensors"]), (
            "the plan sharded the layer's own projections"
        )
        assert True not in got["fusable_on_dtensor"], "a DTensor weight was fused into one matmul"
        if row.inner in READS_OWN_PROJECTIONS_AT_LEVEL_1 or row.family == "gpt_neox":
            assert got["fusable_on_dtensor"], "the sharded projections went through _fusable"
        delta = (got["logits"] - want).abs().max().item()
        assert delta <= ATOL, f"rank {rank}: max |logits - one-process logits| = {delta:.3g}"


if __name__ == "__main__":  # a torchrun rank: python test_tensor_parallel_load.py FOLDER
    _rank_main(Path(sys.argv[1]))
