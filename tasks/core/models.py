"""The architectures, the loss and the optimizer: plain `nn.Module`s and `torch.optim`.

Every model starts with a `Normalize` layer holding the train split's statistics, so saved and
exported models take raw pixels as float32 and nobody has to re-implement the preprocessing. The
CNN adapts to the data: the manifest's channels and image size (8x8 grey up to photos of a few
hundred pixels), with an average pooling that caps what reaches the classifier at 4x4 positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CLASSIFIER_GRID = 4  # at most 4x4 positions per channel reach the last layer


class Normalize(nn.Module):
    """(x * scale - mean) / std per channel: raw pixels in, standardised values out."""

    def __init__(self, scale: float, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.mean) / self.std


def mlp(in_shape: list[int], n_classes: int, hidden: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


def cnn(in_shape: list[int], n_classes: int, channels: list[int], dropout: float) -> nn.Sequential:
    """3x3 conv + ReLU blocks, each halving the image while it is at least 2 pixels wide.

    Larger images end with an average pool down to at most 4x4, so the classifier's size does not
    grow with the image; images that are already that small (the 8x8 digits) get no extra layer.
    A plain `AvgPool2d` with the kernel worked out here, not `AdaptiveAvgPool2d`: the adaptive
    one's backward pass has no deterministic CUDA kernel, and training must be reproducible.
    """
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    if h > CLASSIFIER_GRID or w > CLASSIFIER_GRID:
        kernel = (math.ceil(h / CLASSIFIER_GRID), math.ceil(w / CLASSIFIER_GRID))
        layers.append(nn.AvgPool2d(kernel))  # stride = kernel; a remainder of rows or columns is dropped
        h, w = h // kernel[0], w // kernel[1]
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, n_classes))


def build_model(
    kind: str,
    in_shape: list[int],
    n_classes: int,
    normalisation: dict,
    channels: list[int],
    hidden: list[int],
    dropout: float,
) -> nn.Sequential:
    """The architecture only; weights come from `torch.manual_seed` or a state dict."""
    net = mlp(in_shape, n_classes, hidden, dropout) if kind == "mlp" else cnn(in_shape, n_classes, channels, dropout)
    norm = normalisation
    return nn.Sequential(Normalize(norm["scale"], norm["mean"], norm["std"]), net)


def build_loss(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
