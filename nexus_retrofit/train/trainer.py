"""SFTTrainer with the Nexus parameters in their own optimizer groups, and an optional inner-only phase.

The inner attention modules and gates are new, randomly initialised (or zero) parameters next to
pretrained ones, so they may want a larger learning rate (`nexus.inner_lr_multiplier`) and a short
phase where only they train (`nexus.inner_only_steps`). Both are done through the optimizer and the
scheduler, not by toggling `requires_grad`: DDP, DeepSpeed ZeRO and FSDP fix the set of trainable
parameters when they wrap the model, and a parameter whose learning rate is 0 stays bit-identical
under every AdamW variant. The scheduler scales every group, so warmup and decay apply to both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from ..converter import is_nexus_parameter
from .recipe import RecipeError

logger = logging.getLogger(__name__)

GATE_MARKER = ".self_attn.gates."


def nexus_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    learning_rate: float,
    multiplier: float,
) -> list[dict]:
    """Optimizer groups: base and Nexus parameters, each with and without weight decay.

    Nexus groups get `learning_rate * multiplier`. Gates are never decayed: decay would pull them
    back to zero, i.e. back to the base model.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (n, d): [] for n in (False, True) for d in (True, False)
    }
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        nexus = is_nexus_parameter(name)
        decays = name in decay_names and GATE_MARKER not in name
        buckets[(nexus, decays)].append(param)
    groups = []
    for (nexus, decays), params in buckets.items():
        if params:
            groups.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decays else 0.0,
                    "lr": learning_rate * (multiplier if nexus else 1.0),
                    "name": ("nexus" if nexus else "base") + ("" if decays else "_no_decay"),
                    "nexus": nexus,
                }
            )
    return groups


def hold_until(schedule: Callable[[int], float], steps: int) -> Callable[[int], float]:
    """A schedule that is 0 for the first `steps` optimizer steps, then `schedule` (same step count)."""

    def held(step: int) -> float:  # a plain function: LambdaLR leaves it out of its state dict
        return 0.0 if step < steps else schedule(step)

    return held


class NexusPhaseCallback(TrainerCallback):
    """Logs the parameter groups at the start and the end of the inner-only phase."""

    def __init__(self, inner_only_steps: int):
        self.inner_only_steps = inner_only_steps

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
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

    def on_step_end(self, args, state, control, **kwargs):
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

    def __init__(self, *args, inner_lr_multiplier: float = 1.0, inner_only_steps: int = 0, **kwargs):
        self.inner_lr_multiplier = inner_lr_multiplier
        self.inner_only_steps = inner_only_steps
        self._step_lrs: dict[str, float] = {}
        callbacks = list(kwargs.pop("callbacks", None) or [])
        super().__init__(*args, callbacks=[*callbacks, NexusPhaseCallback(inner_only_steps)], **kwargs)
        self.nexus_groups = any(is_nexus_parameter(n) for n, _ in self.model.named_parameters())
        if not self.nexus_groups and (inner_lr_multiplier != 1.0 or inner_only_steps):
            raise RecipeError(
                "nexus.inner_lr_multiplier / nexus.inner_only_steps need a Nexus model, but it has no Nexus parameters"
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None or not self.nexus_groups:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = nexus_param_groups(
            opt_model.named_parameters(),
            set(self.get_decay_parameter_names(opt_model)),
            self.args.weight_decay,
            self.args.learning_rate,
            self.inner_lr_multiplier,
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

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
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

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.nexus_groups:  # the learning rates this optimizer step will use, for the logs
            lrs: dict[str, float] = {}
            for group in self.optimizer.param_groups:
                lrs.setdefault("nexus" if group.get("nexus") else "base", group["lr"])
            self._step_lrs = lrs
        loss = super().training_step(model, inputs, num_items_in_batch)
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.nexus_groups and "loss" in logs:
            if "nexus" in self._step_lrs:
                logs["learning_rate_nexus"] = self._step_lrs["nexus"]
            gates = [
                p.detach().float() for n, p in self.model.named_parameters() if GATE_MARKER in n and p.numel()
            ]
            if gates:
                flat = torch.cat([g.flatten() for g in gates]).abs()
                logs["nexus_gate_abs_mean"] = round(flat.mean().item(), 6)
                logs["nexus_gate_abs_max"] = round(flat.max().item(), 6)
        super().log(logs, start_time)
