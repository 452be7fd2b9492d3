"""SFTTrainer with the Nexus parameters in their own optimizer groups, and an optional inner-only phase.

The inner attention modules and gates are new, randomly initialised (or zero) parameters next to
pretrained ones, so they may want their own learning rates: `nexus.inner_lr_multiplier` for the inner
modules, `nexus.gate_lr_multiplier` for the gates (a multiplier on every new parameter made the inner
path explode in the retrofit study; one on the gates alone opened zero gates without harm), and a
short phase where only they train (`nexus.inner_only_steps`). On logging steps the trainer also logs
the gates (|f(g)|) and the path strength per refined projection p, ||f(g_p) Inner_p(X)|| / ||X||
mean over layers (`nexus_path_q`, ...): how much of the signal the Nexus path carries. Both are done through the optimizer and the
scheduler, not by toggling `requires_grad`: DDP, DeepSpeed ZeRO and FSDP fix the set of trainable
parameters when they wrap the model, and a parameter whose learning rate is 0 stays bit-identical
under every AdamW variant. The scheduler scales every group, so warmup and decay apply to both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from ..modeling import NexusAttentionMixin
from ..modeling.names import is_gate, is_nexus_parameter
from .errors import RecipeError
from .lora import is_peft_model, load_gates, save_gates, unfreeze_gates
from .renamed_weights import load_renamed_weights

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


def nexus_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    learning_rate: float,
    multiplier: float,
    gate_multiplier: float | None = None,
) -> list[dict]:
    """Optimizer groups: base and Nexus parameters, each with and without weight decay.

    Inner modules get `learning_rate * multiplier`. Gates get `learning_rate * gate_multiplier` in a
    group of their own ("nexus_gates"), or share the inner modules' rate (and the "nexus_no_decay"
    group) when gate_multiplier is None or the same. Gates are never decayed: decay would pull them
    back to their start, i.e. to the base model.
    """
    own_gate_group = gate_multiplier is not None and gate_multiplier != multiplier
    buckets: dict[str, list[nn.Parameter]] = {
        "base": [],
        "base_no_decay": [],
        "nexus": [],
        "nexus_no_decay": [],
        "nexus_gates": [],
    }
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        gate = is_gate(name)
        if gate and own_gate_group:
            buckets["nexus_gates"].append(param)
            continue
        prefix = "nexus" if is_nexus_parameter(name) else "base"
        decays = name in decay_names and not gate
        buckets[prefix + ("" if decays else "_no_decay")].append(param)
    lrs = {"base": learning_rate, "nexus": learning_rate * multiplier}
    lrs["nexus_gates"] = learning_rate * (gate_multiplier if own_gate_group else multiplier)
    groups = []
    for name, params in buckets.items():
        if params:
            kind = "nexus_gates" if name == "nexus_gates" else name.removesuffix("_no_decay")
            groups.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if name in ("base", "nexus") else 0.0,
                    "lr": lrs[kind],
                    "name": name,
                    "nexus": kind != "base",
                }
            )
    return groups


def nexus_attentions(model: nn.Module) -> list[NexusAttentionMixin]:
    return [m for m in model.modules() if isinstance(m, NexusAttentionMixin)]


class PathProbe:
    """Installed as a Nexus attention's `path_hook`: keeps ||X_p - X|| / ||X|| of the last level (the
    gated path's share, ||f(g_p) * Inner_p(X)|| / ||X||; with gate="none" ||X_p|| / ||X||)."""

    def __init__(self, gated: bool) -> None:
        self.gated = gated
        self.strength: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, p: str, base: torch.Tensor, refined: torch.Tensor) -> None:
        path = refined - base if self.gated else refined
        self.strength[p] = (path.float().norm() / base.float().norm().clamp_min(1e-12)).item()


def set_path_probes(model: nn.Module, on: bool) -> None:
    """Install a fresh path probe on every Nexus attention for its next forward passes (or remove it)."""
    for attention in nexus_attentions(model):
        attention.path_hook = PathProbe(attention.gate_spec.gated) if on else None


def path_strength(model: nn.Module) -> dict[str, float]:
    """Per refined projection p: ||f(g_p) * Inner_p(X)|| / ||X|| of the last probed forward, mean over layers."""
    values: dict[str, list[float]] = {}
    for attention in nexus_attentions(model):
        probe = attention.path_hook
        for p, value in probe.strength.items() if isinstance(probe, PathProbe) else ():
            values.setdefault(p, []).append(value)
    return {p: sum(v) / len(v) for p, v in values.items()}


def gate_statistics(model: nn.Module) -> dict[str, float]:
    """Mean and max of |f(g)| over every gate value (gate_fn applied), for the logs.

    Under FSDP a rank holds a shard of each gate, possibly an empty one, so the sums, counts and maxima
    are reduced over the processes (every process logs); replicas (DDP) give the same mean and max.
    """
    gates = [
        a.gate_values(p).detach().float().flatten()
        for a in nexus_attentions(model)
        for p in getattr(a, "gates", {})
    ]
    if not gates:
        return {}
    flat = torch.cat(gates).abs()
    totals = torch.tensor([flat.sum().item(), flat.numel()], dtype=torch.float64, device=flat.device)
    peak = torch.tensor([flat.max().item() if flat.numel() else 0.0], dtype=torch.float64, device=flat.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if totals[1] == 0:
        return {}
    return {
        "nexus_gate_abs_mean": round((totals[0] / totals[1]).item(), 6),
        "nexus_gate_abs_max": round(peak.item(), 6),
    }


def hold_until(schedule: Callable[[int], float], steps: int) -> Callable[[int], float]:
    """A schedule that is 0 for the first `steps` optimizer steps, then `schedule` (same step count)."""

    def held(step: int) -> float:  # a plain function: LambdaLR leaves it out of its state dict
        return 0.0 if step < steps else schedule(step)

    return held


class NexusPhaseCallback(TrainerCallback):
    """Logs the parameter groups at the start and the end of the inner-only phase."""

    def __init__(self, inner_only_steps: int):
        self.inner_only_steps = inner_only_steps

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs,
    ) -> None:
        if optimizer is None or not state.is_world_process_zero:
            return
        for group in optimizer.param_groups:
            if "name" in group:
                count = sum(p.numel() for p in group["params"])
                logger.info(
                    "optimizer group %-15s %12s parameters, lr %.3g",
                    group["name"],
                    f"{count:,}",
                    group.get("initial_lr", group["lr"]),
                )
        if state.global_step < self.inner_only_steps:
            logger.info(
                "nexus: inner-only warm-up until step %d: only the inner modules and gates train (base lr 0)",
                self.inner_only_steps,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        if (
            self.inner_only_steps
            and state.global_step == self.inner_only_steps
            and state.is_world_process_zero
        ):
            logger.info(
                "nexus: inner-only warm-up done at step %d: every parameter trains from now on",
                state.global_step,
            )


class NexusSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer; on a Nexus model, separate optimizer groups, an inner-only phase and gate logs."""

    def __init__(
        self,
        *args,
        inner_lr_multiplier: float = 1.0,
        inner_only_steps: int = 0,
        gate_lr_multiplier: float | None = None,
        **kwargs,
    ):
        self.inner_lr_multiplier = inner_lr_multiplier
        self.inner_only_steps = inner_only_steps
        self._step_lrs: dict[str, float] = {}
        self._path_strength: dict[str, float] = {}
        callbacks = list(kwargs.pop("callbacks", None) or [])
        super().__init__(*args, callbacks=[*callbacks, NexusPhaseCallback(inner_only_steps)], **kwargs)
        if is_peft_model(self.model):  # with peft_config: PEFT froze the gates, which train in full (lora.py)
            unfreeze_gates(self.model)
        self.nexus_groups = any(is_nexus_parameter(n) for n, _ in self.model.named_parameters())
        if not self.nexus_groups and (inner_lr_multiplier != 1.0 or inner_only_steps):
            raise RecipeError(
                "nexus.inner_lr_multiplier / nexus.inner_only_steps need a Nexus model, but it has no Nexus parameters"
            )
        # The gates' rate (a training setting, from the recipe); None: the inner modules' rate.
        self.gate_lr_multiplier = gate_lr_multiplier

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save and is_peft_model(self.model):  # the adapter file leaves the gates out
            save_gates(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.model if model is None else model
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # those engines load their own files
            load_renamed_weights(target, resume_from_checkpoint)  # GPT-NeoX's embed_out (renamed_weights.py)
        if is_peft_model(target):  # PEFT reloaded the adapter; the gates come from their own file
            load_gates(target, resume_from_checkpoint)
            unfreeze_gates(target)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or not self.nexus_groups:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = nexus_param_groups(
            opt_model.named_parameters(),
            set(self.get_decay_parameter_names(opt_model)),
            self.args.weight_decay,
            self.args.learning_rate,
            self.inner_lr_multiplier,
            self.gate_lr_multiplier,
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(
            optimizer_kwargs
        ):
            raise RecipeError(
                f"optim={self.args.optim!r} builds its own parameter groups; a Nexus run needs a standard optimizer "
                "(e.g. adamw_torch_fused) to give the inner modules their own learning rate"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not (fresh and self.nexus_groups and self.inner_only_steps):
            return scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise RecipeError(
                f"nexus.inner_only_steps needs a step-based lr_scheduler_type (linear, cosine, constant, ...), "
                f"got {self.args.lr_scheduler_type!r} ({type(scheduler).__name__})"
            )
        groups = scheduler.optimizer.param_groups
        for i, group in enumerate(groups):
            if not group.get("nexus", False):
                scheduler.lr_lambdas[i] = hold_until(scheduler.lr_lambdas[i], self.inner_only_steps)
        for group, base_lr, schedule in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
        return scheduler

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self.nexus_groups:  # the learning rates this optimizer step will use, for the logs
            lrs: dict[str, float] = {}
            for group in self.optimizer.param_groups:
                name = group.get("name", "")
                kind = "gates" if name == "nexus_gates" else "nexus" if group.get("nexus") else "base"
                lrs.setdefault(kind, group["lr"])
            self._step_lrs = lrs
        probe = self.nexus_groups and self._logs_this_step()
        if probe:
            set_path_probes(self.model, True)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if probe:
            self._path_strength = path_strength(self.model)
            set_path_probes(self.model, False)
        if self.nexus_groups and self.state.global_step < self.inner_only_steps:
            self._drop_base_grads()
        return loss

    def _drop_base_grads(self) -> None:
        """Inner-only phase: base gradients out of the clipping norm (their lr is 0 regardless)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # gradients live in the engine's own buffers; lr 0 keeps the base frozen
        for group in self.optimizer.param_groups:
            if not group.get("nexus", False):
                for param in group["params"]:
                    param.grad = None

    def _logs_this_step(self) -> bool:
        """True when the optimizer step now running ends on a logging step (path strength is probed then)."""
        step = self.state.global_step + 1
        every = self.state.logging_steps or self.args.logging_steps
        every = max(1, int(every if every >= 1 else every * max(1, self.state.max_steps)))
        return step % every == 0 or (step == 1 and self.args.logging_first_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.nexus_groups and "loss" in logs:
            if "nexus" in self._step_lrs:
                logs["learning_rate_nexus"] = self._step_lrs["nexus"]
            if "gates" in self._step_lrs:
                logs["learning_rate_gates"] = self._step_lrs["gates"]
            logs.update(gate_statistics(self.model))
            for p, value in self._path_strength.items():  # ||f(g_p) Inner_p(X)|| / ||X||, mean over layers
                logs[f"nexus_path_{p}"] = round(value, 6)
            self._path_strength = {}
        super().log(logs, start_time)


class ClaimCheckpoints(TrainerCallback):
    """Each checkpoint-N the Trainer saves is recorded as this tool's (nexus_retrofit.safe_output's
    manifest) as soon as it exists, so an --overwrite_output_dir after a killed run removes it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        from ..safe_output import claim

        name = f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and (self.output_dir / name).is_dir():
            # TRL writes its model card, README.md, beside every checkpoint: claimed with it, or a run
            # killed after a checkpoint could not be resumed (a foreign README.md is refused up front)
            claim(self.output_dir, [name, "README.md"], "train")
