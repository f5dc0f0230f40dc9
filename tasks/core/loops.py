"""The two loops: one epoch of training, and evaluation (validation every epoch, and the test).

`train_one_epoch` is the classic `zero_grad` / forward / loss / `backward` / `step`, with the
recipe's few extra lines in plain sight: gradient accumulation over `accumulate` batches, mixed
precision (`torch.autocast`, and a gradient scaler for fp16), gradient clipping, and a
learning-rate scheduler stepped after each optimizer step. `validate` is the cheap per-epoch
check (loss and accuracy); `evaluate` runs the model under `model.eval()` and `torch.no_grad()`
with torchmetrics accumulating batch by batch, for the test. Batches arrive as uint8 images: they
become float32 here, on the device, and the model normalises them itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Recipe:
    """How each optimizer step is taken; the defaults are the plain loop."""

    accumulate: int = 1  # batches per optimizer step
    clip_grad_norm: float = 0.0  # 0: no clipping
    autocast: torch.dtype | None = None  # torch.bfloat16 or torch.float16: mixed precision
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    channels_last: bool = False
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every optimizer step


@dataclass
class EpochState:
    """Where an epoch stands: what a checkpoint in the middle of one must hold to go on exactly."""

    batches: int = 0  # batches done in this epoch
    steps: int = 0  # optimizer steps done in the whole run
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    seen: int = 0
    first_loss: float | None = None  # the epoch's first batch, before its step


WARMUP_START = 0.01  # linear warm-up starts at 1 % of the learning rate


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    step_epochs: int = 10,
    gamma: float = 0.1,
    patience: int = 2,
    min_lr: float = 0.0,
    maximize: bool = True,
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, torch.optim.lr_scheduler.ReduceLROnPlateau | None]:
    """(scheduler stepped after every optimizer step, plateau scheduler stepped after every epoch).

    Epoch-based settings are turned into optimizer steps, so a schedule ends where training ends
    whatever the batch size or accumulation. Warm-up is linear from 1 % of `lr`, then the named
    schedule runs over the remaining steps (step, cosine) or, for plateau, watches each epoch's
    selection metric from then on. One-cycle has its own warm-up.
    """
    from torch.optim import lr_scheduler as sched

    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1) if warmup_epochs else 0
    main: sched.LRScheduler | None = None
    plateau = None
    if name == "step":
        main = sched.StepLR(optimizer, step_size=max(1, step_epochs * steps_per_epoch), gamma=gamma)
    elif name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=min_lr)
    elif name == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, total)), None
    elif name == "plateau":
        mode = "max" if maximize else "min"
        plateau = sched.ReduceLROnPlateau(optimizer, mode=mode, factor=gamma, patience=patience, min_lr=min_lr)
    if not warmup:
        return main, plateau
    ramp = sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup)
    if main is None:
        return ramp, plateau
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup]), plateau


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    n_batches: int,
    recipe: Recipe | None = None,
    state: EpochState | None = None,
    after_step: Callable[[EpochState], None] | None = None,
) -> EpochState:
    """One pass over `batches` (the `n_batches` of the epoch not yet done in `state`).

    `after_step(state)` runs after every optimizer step: where train writes a checkpoint every N
    steps. Gradients are zero there, so a resume from that point loses nothing.
    """
    recipe = recipe or Recipe()
    state = state or EpochState()
    state.loss_sum = state.loss_sum.to(device)
    every = recipe.accumulate
    model.train()
    for x, y in batches:
        b = state.batches
        first_of_group, last_of_group = b % every == 0, (b + 1) % every == 0 or b + 1 == n_batches
        group = min(every, n_batches - b + b % every)  # batches in this step: the last group may be short
        x, y = to_input(x, device, recipe.channels_last), y.to(device, non_blocking=True)
        if first_of_group:
            optimizer.zero_grad()
        # Under DDP, gradients are averaged across processes at the group's last backward only.
        sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=recipe.autocast or torch.bfloat16, enabled=bool(recipe.autocast)):
                loss = loss_fn(model(x), y)
            if state.first_loss is None:
                state.first_loss = loss.item()
            scaled = loss / group if group > 1 else loss
            (recipe.scaler.scale(scaled) if recipe.scaler else scaled).backward()
        if last_of_group:
            if recipe.clip_grad_norm:
                if recipe.scaler:
                    recipe.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            if recipe.scaler:
                recipe.scaler.step(optimizer)
                recipe.scaler.update()
            else:
                optimizer.step()
            if recipe.scheduler is not None:
                recipe.scheduler.step()
            state.steps += 1
        state.loss_sum += loss.detach().double() * y.shape[0]
        state.seen += y.shape[0]
        state.batches += 1
        if last_of_group and after_step is not None and state.batches < n_batches:
            after_step(state)
    return state


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    device: torch.device,
    recipe: Recipe | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy: what every epoch needs, without building a metrics collection each time."""
    recipe = recipe or Recipe()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in batches:
        x, y = to_input(x, device, recipe.channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=recipe.autocast or torch.bfloat16, enabled=bool(recipe.autocast)):
            logits = model(x)
            loss = loss_fn(logits, y)
        loss_sum += loss.double() * y.shape[0]
        correct += (logits.argmax(dim=1) == y).sum()
        seen += y.shape[0]
    return {"loss": loss_sum.item() / max(seen, 1), "accuracy": correct.item() / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    n_classes: int,
    device: torch.device,
) -> dict:
    """Loss, accuracy, macro F1, per-class precision/recall, confusion matrix, labels and predictions."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    model.eval()
    metrics = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(n_classes, average="micro"),
            "f1_macro": MulticlassF1Score(n_classes, average="macro"),
            "precision": MulticlassPrecision(n_classes, average=None),
            "recall": MulticlassRecall(n_classes, average=None),
            "confusion": MulticlassConfusionMatrix(n_classes),
        }
    ).to(device)
    total = torch.zeros((), device=device)
    seen = 0
    labels, predictions = [], []
    for x, y in batches:
        x = x.to(device, non_blocking=True).float()
        y = y.to(device, non_blocking=True)
        logits = model(x)
        total += loss_fn(logits, y) * y.shape[0]
        seen += y.shape[0]
        metrics.update(logits, y)
        labels.append(y.cpu())
        predictions.append(logits.argmax(dim=1).cpu())
    out = {k: v.cpu().tolist() for k, v in metrics.compute().items()}
    out["loss"] = total.item() / max(seen, 1)
    out["labels"] = torch.cat(labels)
    out["predictions"] = torch.cat(predictions)
    return out
