"""The two loops: one epoch of training, and evaluation (validation every epoch, and the test).

`train_one_epoch` is the classic `zero_grad` / forward / loss / `backward` / `step`;
`evaluate` runs the model under `model.eval()` and `torch.no_grad()` with torchmetrics
accumulating batch by batch. Batches arrive as uint8 images: they become float32 here, on the
device, and the model normalises them itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[float, float]:
    """(mean train loss over the epoch's samples, the loss of its first batch, before any step)."""
    model.train()
    total = torch.zeros((), device=device)
    seen = 0
    first = None
    for x, y in batches:
        x = x.to(device, non_blocking=True).float()
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if first is None:
            first = loss.item()
        loss.backward()
        optimizer.step()
        total += loss.detach() * y.shape[0]
        seen += y.shape[0]
    return total.item() / max(seen, 1), first if first is not None else float("nan")


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
