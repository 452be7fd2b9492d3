"""`run_training`: one SFT run from a recipe, baseline or Nexus, in-process or under `accelerate launch`.

Order of work: parse and validate the recipe, check the output folder (train/output.py), load the data, read the model
config (to decide whether to convert and to refuse conflicting `nexus:` settings before loading any
weights), load and convert the model, train, save. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..safe_output import OutputError, output_lock
from .errors import RecipeError
from .output import RUN_RECORD, OutputPlan, begin_output, check_location, finish_output, plan_output_dir
from .recipe import Recipe, parse_recipe

__all__ = ["RUN_RECORD", "TrainResult", "run_training"]

if TYPE_CHECKING:
    import torch
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from ..modeling import NexusConfig

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class TrainResult:
    """What a run produced: where, its final metrics and its per-step log."""

    output_dir: Path
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    nexus: dict[str, Any] | None  # the Nexus settings it ran with; None for the baseline
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, training loss) for every logged step."""
        return [(e["step"], e["loss"]) for e in self.log_history if "loss" in e]

    @property
    def train_runtime(self) -> float | None:
        return self.metrics.get("train_runtime")

    @property
    def tokens_per_second(self) -> float | None:
        return self.metrics.get("train_tokens_per_second")


def _on_main_then_share(training: TrainingArguments, fn: Callable[[], _T]) -> _T:
    """Run fn on the main process only and give every process its result (or its RecipeError)."""
    state = training.distributed_state
    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [("ok", fn())]
        except RecipeError as e:
            outcome = [("error", str(e))]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise RecipeError(value)
    return value


def _config_header() -> str:
    import torch
    import transformers
    import trl

    from .. import __version__

    return (
        f"# Recipe as run by nexus-retrofit {__version__} (transformers {transformers.__version__}, "
        f"trl {trl.__version__}, torch {torch.__version__}).\n"
        "# Re-run it with: nexus-retrofit train THIS_FILE\n"
    )


# --- model and tokenizer -------------------------------------------------------------------------


def _torch_dtype(name: str | None) -> torch.dtype | str:
    import torch

    if name in (None, "auto"):
        return "auto"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise RecipeError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return dtype


@contextlib.contextmanager
def _outside_zero3_init(active: bool) -> Iterator[None]:
    """Load full weights even under ZeRO-3, so the converter sees real tensors; DeepSpeed partitions later."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not (active and hf_deepspeed.is_deepspeed_zero3_enabled()):
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    logger.warning(
        "ZeRO-3: loading the full base model on every rank to convert it; DeepSpeed partitions it afterwards"
    )
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def recorded_gate_lr(recipe: Recipe) -> float | None:
    """The gate_lr_multiplier an older release stored in the checkpoint's nexus block (None if none):
    NexusConfig no longer holds it, so it is read from the raw config.json."""
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(
            recipe.model.model_name_or_path, revision=recipe.model.model_revision
        )
    except (OSError, ValueError):
        return None
    nexus = raw.get("nexus")
    return nexus.get("gate_lr_multiplier") if isinstance(nexus, dict) else None


def check_max_length(recipe: Recipe) -> None:
    """Refuse a max_length the model has no positions for (before any work): packed rows of that
    length would index past a learned position table, or run RoPE beyond its trained range. A config
    that cannot be read is left to load_model, which names the problem."""
    from transformers import AutoConfig

    length = recipe.training.max_length
    if length is None:
        return
    name = recipe.model.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(
            name, revision=recipe.model.model_revision, trust_remote_code=recipe.training.trust_remote_code
        )
    except (OSError, ValueError):
        return
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise RecipeError(
            f"max_length {length} is larger than max_position_embeddings {positions} of {name}: set "
            f"max_length to at most {positions}"
        )


def load_model(recipe: Recipe) -> tuple[PreTrainedModel, NexusConfig | None]:
    """The model to train, converted on the fly when the recipe has a `nexus:` block; and its settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import nexus_retrofit  # noqa: F401  (registers the Nexus classes: no remote code for Nexus checkpoints)

    from ..converter import convert
    from ..modeling import NexusConfig

    name = recipe.model.model_name_or_path
    common = dict(revision=recipe.model.model_revision, trust_remote_code=recipe.training.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model_name_or_path {name!r}: could not load its config: {e}") from None
    existing = getattr(config, "nexus", None)
    settings = None
    if recipe.nexus is not None:
        if existing is not None:
            conflicts = recipe.nexus.conflicts(NexusConfig.from_dict(existing))
            if conflicts:
                described = ", ".join(
                    f"nexus.{k}: recipe {a!r}, model {b!r}" for k, (a, b) in conflicts.items()
                )
                raise RecipeError(
                    f"model_name_or_path {name!r} is already a Nexus model with other settings ({described}); "
                    "remove those keys from the nexus block or start from the base model"
                )
            settings = NexusConfig.from_dict(existing)
        else:
            from ..checkpoint import check_config_dict

            try:  # the same refusals as `convert` (custom modeling code, unsupported family), before any weights
                check_config_dict(config.to_dict(), name)
            except ValueError as e:
                raise RecipeError(f"model_name_or_path: {e}") from None
            settings = recipe.nexus.nexus_config()
    elif existing is not None:
        logger.warning(
            "%s is already a Nexus model and the recipe has no nexus block: training it as it is", name
        )

    kwargs = dict(common, dtype=_torch_dtype(recipe.model.dtype))
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    converting = settings is not None and existing is None
    with _outside_zero3_init(converting):
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if converting:
        if any(p.is_meta for p in model.parameters()):
            raise RecipeError(
                "the base weights were not loaded on this process (FSDP cpu-RAM-efficient loading): set "
                "fsdp_cpu_ram_efficient_loading: false in the accelerate config, or convert first with "
                "`nexus-retrofit convert` and train the converted checkpoint"
            )
        from transformers import set_seed

        set_seed(recipe.training.seed)  # the same new inner weights on every rank
        try:
            model = convert(model, settings)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"model_name_or_path {name!r} cannot be converted: {e}") from None
        logger.info("converted %s to Nexus attention: %s", name, settings.to_dict())
    if recipe.training.gradient_checkpointing:
        model.config.use_cache = False
    return model, settings


def load_tokenizer(recipe: Recipe, conversational: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    name = recipe.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=recipe.model.model_revision, trust_remote_code=recipe.training.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise RecipeError(f"model_name_or_path {name!r}: could not load its tokenizer: {e}") from None
    if recipe.script.chat_template:
        tokenizer.chat_template = recipe.script.chat_template
    if conversational and not tokenizer.chat_template and not recipe.training.chat_template_path:
        raise RecipeError(f"the tokenizer of {name} has no chat template: set chat_template in the recipe")
    return tokenizer


# --- the run -------------------------------------------------------------------------------------


def _quiet() -> bool:
    """The CLI asks for people-sized output unless --verbose (NEXUS_RETROFIT_QUIET=1)."""
    return os.environ.get("NEXUS_RETROFIT_QUIET") == "1"


def _progress_without_log_lines(trainer: Trainer) -> None:
    """Keep the Trainer's progress bar, drop the dict it prints at every logging step (the numbers
    still reach the run's log history, trainer_state.json and any report_to integration)."""
    from transformers.trainer_callback import ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs,
        ) -> None:
            pass

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarOnly)


def _setup_logging(training: TrainingArguments) -> None:
    """Show this package's progress messages on the main process without touching the root logger."""
    import datasets
    import transformers

    level = training.get_process_log_level()
    package = logging.getLogger("nexus_retrofit")
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(min(level, logging.INFO) if training.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def _distributed_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_distributed(succeeded: bool) -> None:
    """Destroy the process group this run created (DDP, DeepSpeed and FSDP all use torch's).

    Left to interpreter exit, the group's destructor can hang: a gloo rank was seen blocked joining its
    worker thread when the DDP Reducer was freed. On success the ranks first meet at a barrier, so no
    rank tears the group down while another still talks to it; after an error they may not all be
    here, so no barrier. Accelerate's state is reset so a later run in this process starts afresh.
    """
    import gc

    import torch.distributed as dist

    if not _distributed_initialized():
        return
    gc.collect()  # free the DDP-wrapped model (its Reducer holds the group) while the group is healthy
    try:
        if succeeded:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def run_training(
    recipe: dict | str | os.PathLike,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainResult:
    """Run one SFT run (baseline, or Nexus with a `nexus:` block) and return its result.

    `recipe` is a YAML path or a mapping; `overrides` are `--key value` strings or a mapping (see
    parse_recipe). Safe to call several times in one process. Raises RecipeError for bad settings.
    A process group created during the run (under `accelerate launch`) is destroyed before it returns
    or raises; one that existed before the call is left to its owner.
    """
    owns_group = not _distributed_initialized()
    succeeded = False
    try:
        result = _run(recipe, overrides)
        succeeded = True
        return result
    finally:
        if owns_group:
            end_distributed(succeeded)


def _push(out: Path, training: TrainingArguments) -> None:
    from ..hub import PushError, push_to_hub

    repo_id = training.hub_model_id or out.name
    try:
        plan = push_to_hub(out, repo_id, private=bool(training.hub_private_repo), token=training.hub_token)
    except PushError as e:
        raise RecipeError(f"push_to_hub: {e}") from None
    logger.info("pushed %s to %s (%d files)", out, plan.url or repo_id, len(plan.files))


def _run(recipe: dict | str | os.PathLike, overrides: list[str] | dict[str, Any] | None) -> TrainResult:
    from .lora import check_peft_engine

    parsed = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe, overrides)
    for note in parsed.apply_env():  # the recipe is valid: now its `env:` block may take effect
        logger.warning("recipe: %s", note)
    training = parsed.training
    _setup_logging(training)
    check_peft_engine(training, parsed.model.use_peft)
    check_max_length(parsed)
    if "include_num_input_tokens_seen" not in parsed.values:
        training.include_num_input_tokens_seen = "non_padding"  # for tokens/s in the logs and the result
    with contextlib.ExitStack() as held:
        out = Path(training.output_dir)

        def lock_and_plan() -> OutputPlan:
            check_location(out)
            try:  # one run per folder: a second writer is refused, a killed one never blocks it
                held.enter_context(output_lock(out, "train", "output_dir"))
            except OutputError as e:
                raise RecipeError(str(e)) from None
            return plan_output_dir(parsed)

        plan = _on_main_then_share(training, lock_and_plan)
        return _run_locked(parsed, plan, out)


def _run_locked(parsed: Recipe, plan: OutputPlan, out: Path) -> TrainResult:
    from .data import account_rows, load_datasets
    from .lora import lora_config, merge_adapters
    from .trainer import ClaimCheckpoints, NexusSFTTrainer

    training = parsed.training
    for note in plan.notes:
        logger.warning("%s", note)

    # everything is loaded and validated before the output folder is touched
    train_ds, eval_ds, data_format = load_datasets(parsed.script, training)
    tokenizer = load_tokenizer(parsed, conversational=data_format == "messages")
    # rows read, dropped (and why) and kept, as the trainer will see them: refused before any write
    data_report = account_rows(train_ds, tokenizer, parsed.script, training)
    logger.info("%s", data_report.summary())
    train_ds = data_report.without_dropped(train_ds)  # an allowed share of rows without completion tokens
    if eval_ds is not None:
        eval_ds = account_rows(eval_ds, tokenizer, parsed.script, training, evaluation=True).without_dropped(
            eval_ds
        )
    model, settings = load_model(parsed)
    peft_config = lora_config(parsed.model, model)
    gate_lr, nexus = None, None
    if parsed.nexus is not None and settings is not None:
        gate_lr, notice = parsed.nexus.gate_lr(settings, recorded_gate_lr(parsed))
        if notice:
            logger.warning("%s", notice)
        nexus = parsed.nexus.resolved(settings, gate_lr)

    recipe_text = _config_header() + parsed.to_yaml(nexus)
    main = training.distributed_state.is_main_process
    # push_to_hub: not the Trainer's (it uploads the whole folder, checkpoints and logs, at every save)
    # but `nexus-retrofit push`'s allow-list and secret checks, once, after the final save
    push, training.push_to_hub = training.push_to_hub, False

    trainer = NexusSFTTrainer(
        model=model,
        args=training,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        inner_lr_multiplier=parsed.nexus.inner_lr_multiplier if nexus else 1.0,
        inner_only_steps=parsed.nexus.inner_only_steps if nexus else 0,
        gate_lr_multiplier=gate_lr,  # a training setting: the recipe's, never the checkpoint's config
    )
    # The trainer has tokenized and truncated the data: only now is the old run's final model removed.
    before = begin_output(out, plan, recipe_text) if main else {}
    training.distributed_state.wait_for_everyone()  # no rank writes before the old final model is gone
    if main:
        trainer.add_callback(ClaimCheckpoints(out))
    # use_liger_kernel: the Trainer patches the Nexus model like its family (train/liger.py registers it)
    if _quiet():
        _progress_without_log_lines(trainer)
    if plan.resume:
        logger.info("resuming from %s", plan.resume)
    output = trainer.train(resume_from_checkpoint=plan.resume)

    metrics = dict(output.metrics)
    runtime = metrics.get("train_runtime") or 0.0
    seen = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    if runtime > 0 and seen:
        metrics.setdefault("train_tokens_per_second", round(seen / runtime, 3))
    if not _quiet():
        trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    merge_adapters(trainer)  # use_peft: the run folder holds the merged model, not an adapter
    trainer.model.config.use_cache = True  # restore the KV cache for inference
    trainer.save_model(training.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training.output_dir)
        finish_output(out, before, recipe_text, data=data_report.to_dict())
    if push and trainer.accelerator.is_main_process:  # the final model, through push's allow-list
        _push(out, training)
    for tracker in trainer.accelerator.trackers:
        tracker.finish()
    return TrainResult(
        output_dir=out,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
        nexus=nexus,
        resumed_from=plan.resume,
        notes=[*parsed.notes, *plan.notes],
    )
