"""Pretraining from scratch: `init` outputs trained on the shipped plain text with the Pythia recipes.

The runs are the Pythia-70M recipes themselves, shrunk on the command line (as a user would for a
smoke run): a tiny config instead of Pythia's, the shipped facts corpus instead of the Pile, 4 steps.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nexus_retrofit import NexusConfig, init_from_config
from nexus_retrofit.demo.assets import facts_text_path, tiny_model_path
from nexus_retrofit.demo.facts import facts_corpus
from nexus_retrofit.families import FAMILIES as SUPPORTED
from nexus_retrofit.modeling.names import is_nexus_parameter
from nexus_retrofit.train import RecipeError, parse_recipe, run_training
from nexus_retrofit.train.data import load_source
from tests.conftest import tiny_base_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "Pythia-70M" / "pretrain"
BASELINE, NEXUS_RECIPE = RECIPES / "config_baseline.yaml", RECIPES / "config_nexus.yaml"
POSITIONS = 128  # the tiny configs' max_position_embeddings


def _family(name: str):
    missing = name == "gpt_neox" and name not in SUPPORTED
    return pytest.param(name, id=name, marks=pytest.mark.skipif(missing, reason="no gpt_neox family yet"))


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[str, Path]:
    """`init` outputs of tiny qwen2 and gpt_neox configs with the shipped tokenizer (vocab 512)."""
    made = {}
    for family in [f for f in ("qwen2", "gpt_neox") if f in SUPPORTED]:
        folder = tmp_path_factory.mktemp(f"init-{family}")
        config = tiny_base_model(
            family, vocab_size=512, max_position_embeddings=POSITIONS, pad_token_id=None
        ).config
        config.save_pretrained(folder / "config")
        init_from_config(folder / "config", folder / "init", tokenizer=tiny_model_path())  # the paper's form
        made[family] = folder / "init"
    return made


def smoke(model: Path, output: Path, *more: str) -> list[str]:
    """The recipe's command-line overrides for a 4-step CPU run on the shipped text."""
    return [
        "--model_name_or_path", str(model), "--output_dir", str(output),
        "--dataset_name", str(facts_text_path()), "--dataset_streaming", "false",
        "--max_length", "64", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--max_steps", "4", "--warmup_steps", "0", "--fp16", "false", "--use_cpu", "true",
        "--optim", "adamw_torch", "--dataloader_num_workers", "0", "--save_strategy", "no",
        "--logging_steps", "1", "--disable_tqdm", "true", *more,
    ]  # fmt: skip


@pytest.mark.parametrize("family", [_family(f) for f in ("qwen2", "gpt_neox")])
@pytest.mark.parametrize("arm", ["baseline", "nexus"])
def test_a_few_pretraining_steps_lower_the_loss(inits, tmp_path, family, arm):
    init = inits[family]
    recipe = BASELINE if arm == "baseline" else NEXUS_RECIPE
    start = load_file(init / arm / "model.safetensors")
    result = run_training(recipe, smoke(init / arm, tmp_path / "run"))
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert sorted(trained) == sorted(start)
    changed = {name for name in start if not torch.equal(start[name], trained[name])}
    nexus = {name for name in start if is_nexus_parameter(name)}
    assert bool(nexus) == (arm == "nexus") and nexus <= changed  # the inner modules train too
    assert (result.nexus is None) == (arm == "baseline")


@pytest.mark.parametrize("streaming", [pytest.param(False, id="txt"), pytest.param(True, id="txt-streamed")])
def test_resume_gives_the_uninterrupted_run_s_weights(inits, tmp_path, monkeypatch, streaming):
    """Interrupted (Ctrl-C) in step 3 of 4 after checkpoint-2, then resumed: the same weights as never
    interrupted, with the recipe's cosine schedule and warm-up (a shorter first run would decay sooner)."""
    from nexus_retrofit.train.trainer import NexusSFTTrainer

    init = inits["gpt_neox" if "gpt_neox" in inits else "qwen2"] / "nexus"
    more = ["--save_strategy", "steps", "--save_steps", "2", "--warmup_steps", "1",
            "--dataset_streaming", str(streaming).lower()]  # fmt: skip
    straight = run_training(NEXUS_RECIPE, smoke(init, tmp_path / "straight") + more)

    step = NexusSFTTrainer.training_step

    def killed_in_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("interrupted")
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(NexusSFTTrainer, "training_step", killed_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            run_training(NEXUS_RECIPE, smoke(init, tmp_path / "run") + more)
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (
        tmp_path / "run" / "model.safetensors"
    ).exists()
    resumed = run_training(
        NEXUS_RECIPE, smoke(init, tmp_path / "run") + more + ["--resume_from_checkpoint", "true"]
    )
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in straight.losses]
    want, got = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "run"))
    assert sorted(got) == sorted(want)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []


@pytest.mark.parametrize(
    ("family", "shard"), [(f, s) for f in ("gpt_neox", "qwen2") for s in (None, "100KB")]
)
def test_renamed_weights_come_back_from_a_checkpoint(tmp_path, family, shard):
    """What resume adds to the Trainer's plain load_state_dict: GPT-NeoX's lm_head, saved as embed_out
    (single file or sharded); nothing for a family that renames nothing."""
    from nexus_retrofit.train.renamed_weights import load_renamed_weights

    if family not in SUPPORTED:
        pytest.skip(f"no {family} family yet")
    saved = tiny_base_model(family, seed=1)
    saved.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    fresh = tiny_base_model(family, seed=2)
    loaded = load_renamed_weights(fresh, tmp_path)
    head = fresh.get_output_embeddings().weight
    assert loaded == (["lm_head.weight"] if family == "gpt_neox" else [])
    assert torch.equal(head, saved.get_output_embeddings().weight) == (family == "gpt_neox")


def test_bad_pretraining_recipes_fail_before_any_work(inits, tmp_path):
    init = next(iter(inits.values())) / "baseline"
    out = tmp_path / "run"
    cases = [  # (overrides, fragment of the one-line error)
        (["--max_length", str(POSITIONS + 1)], f"max_length {POSITIONS + 1} is larger than max_position_embeddings "
         f"{POSITIONS} of {init}: set max_length to at most {POSITIONS}"),
        (["--dataset_streaming", "true", "--max_steps", "-1"], "dataset_streaming: true needs max_steps"),
        (["--dataset_config", "sentence"], "a .txt dataset is read by line, paragraph, document"),
    ]  # fmt: skip
    for overrides, fragment in cases:
        with pytest.raises(RecipeError) as caught:
            run_training(BASELINE, smoke(init, out) + overrides)
        assert fragment in str(caught.value) and "\n" not in str(caught.value), caught.value
        assert not out.exists()


# ------------------------------------------------------------------------------------ the recipes
PYTHIA_70M = {  # EleutherAI/pythia models/70M/pythia-70m.yml
    "max_length": 2048, "max_steps": 143000, "warmup_steps": 1430, "learning_rate": 1e-3,
    "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "weight_decay": 0.1, "max_grad_norm": 1.0,
    "fp16": True, "packing": True, "packing_strategy": "wrapped", "lr_scheduler_type": "cosine_with_min_lr",
}  # fmt: skip
PER_VARIANT = {"model_name_or_path", "output_dir", "hub_model_id"}


def _init_flags(path: Path) -> NexusConfig:
    """The NexusConfig the `nexus-retrofit init` line in a recipe's header comment writes."""
    line = next(line for line in path.read_text().splitlines() if "nexus-retrofit init " in line)
    flags = re.findall(r"--(order|proj|inner) (\S+)", line.split("#", 2)[1])
    settings = dict(flags)
    return NexusConfig(
        order=int(settings.get("order", 2)),
        projections=settings.get("proj", "qk"),
        inner=settings.get("inner", "separate"),
        gate="none",
    )


@pytest.mark.parametrize("path", sorted(RECIPES.glob("config_*.yaml")), ids=lambda p: p.stem)
def test_every_pythia_recipe_is_the_baseline_s_but_its_model(path):
    recipe = parse_recipe(path)
    base = parse_recipe(BASELINE)
    for key, value in PYTHIA_70M.items():
        assert (
            recipe.values[key] == pytest.approx(value)
            if isinstance(value, float)
            else recipe.values[key] == value
        )
    assert recipe.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (
        recipe.script.dataset_streaming and recipe.script.dataset_name == "EleutherAI/the_pile_deduplicated"
    )
    assert (
        recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps * 8 == 1024
    )
    shared = {k: v for k, v in recipe.values.items() if k not in PER_VARIANT}
    assert shared == {k: v for k, v in base.values.items() if k not in PER_VARIANT}
    if path == BASELINE:
        assert recipe.nexus is None and recipe.model.model_name_or_path.endswith("/baseline")
        return
    init_folder = re.search(r"nexus-retrofit init EleutherAI/pythia-70m (\S+)", path.read_text())[1]
    assert recipe.model.model_name_or_path == f"{init_folder}/nexus"
    assert recipe.nexus.nexus_config() == _init_flags(path)  # the header's init writes what the block states
    assert recipe.nexus.inner_lr_multiplier == 1.0


def test_the_pythia_recipes_cover_table_2():
    blocks = {p.stem: yaml.safe_load(p.read_text()).get("nexus") for p in RECIPES.glob("config_*.yaml")}
    readings = {(b["projections"], b["inner"], b["order"]) for b in blocks.values() if b}
    assert readings == {
        ("qk", "separate", 2), ("q", "separate", 2), ("qkv", "separate", 2), ("qk", "shared", 2), ("qk", "separate", 3),
    }  # fmt: skip


# ------------------------------------------------------------------------------------ the corpus
def test_the_shipped_corpus_is_the_generator_s():
    text = facts_text_path().read_text(encoding="utf-8")
    assert text == facts_corpus()  # rebuilt by `python -m nexus_retrofit.demo.facts --out ...`
    assert len(text.encode()) < 300_000 and "\n\n" not in text
    assert facts_corpus(50, seed=1) != facts_corpus(50, seed=0)


TEXT = "one fact.\ntwo facts.\n\nthree\nfacts.\n\n  \n"


@pytest.mark.parametrize(
    ("config", "rows"),
    [(None, ["one fact.", "two facts.", "three", "facts."]), ("paragraph", ["one fact.\ntwo facts.", "three\nfacts."]),
     ("document", [TEXT])],
)  # fmt: skip
def test_a_txt_file_is_one_row_per_line_paragraph_or_document(tmp_path, config, rows):
    """Blank (or blank-looking) rows are skipped: they would train on a lone EOS token."""
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    for streaming in (False, True):
        train = load_source(str(path), config, "dataset_name", streaming=streaming)["train"]
        assert [row["text"] for row in train] == rows


# ------------------------------------------------------------------------------------ the costs
@pytest.mark.skipif("gpt_neox" not in SUPPORTED, reason="no gpt_neox family yet")
def test_the_cost_script_builds_pythia_s_published_sizes():
    """scripts/pythia_costs.py (recipes/README.md's cost table): Pythia's total parameter counts, and a
    Nexus-QK model whose counted FLOPs exceed the baseline's by more than its extra parameters."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pythia_costs", RECIPES.parents[2] / "scripts" / "pythia_costs.py"
    )
    costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(costs)
    published = {"70M": 70_426_624, "160M": 162_322_944, "410M": 405_334_016, "1B": 1_011_781_632}
    assert {size: costs.parameters(size, None)[0] for size in published} == published
    base, nexus = (costs.flops_per_token("70M", n) for n in (None, NexusConfig(gate="none")))
    extra_params = costs.parameters("70M", NexusConfig(gate="none"))[1] - costs.parameters("70M", None)[1]
    assert nexus - base > 6 * extra_params  # the inner attention calls cost beyond their weights
    assert costs.TOKENS == 299_892_736_000
