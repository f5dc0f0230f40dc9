"""build: the model, its seeded initial weights, the loss and the optimizer, from params.

    python -m tasks build            # or: dvc repro build

Writes `models/build/init.pt` (the initial state dict) and `models/build/summary.json`
(architecture, parameter count). The model starts with a `Normalize` layer holding the train
split's statistics, so every saved or exported model takes raw pixels as float32 and nobody
has to re-implement the preprocessing to use it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tasks.errors import InputError
from tasks.files import json_text, load_torch, read_json, save_torch, staged
from tasks.params import Build, Params, Train
from tasks.prepare import MANIFEST

OUT_DIR = Path("models/build")
INIT = OUT_DIR / "init.pt"
SUMMARY = OUT_DIR / "summary.json"


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
    """3x3 conv + ReLU blocks; each halves the image while it is at least 2 pixels wide."""
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, n_classes))


def build_model(cfg: Build, manifest: dict) -> nn.Sequential:
    """The architecture only; weights come from `torch.manual_seed` or a state dict."""
    shape, n_classes = manifest["input_shape"], len(manifest["classes"])
    norm = manifest["normalisation"]
    if cfg.model == "mlp":
        net = mlp(shape, n_classes, cfg.hidden, cfg.dropout)
    else:
        net = cnn(shape, n_classes, cfg.channels, cfg.dropout)
    return nn.Sequential(Normalize(norm["scale"], norm["mean"], norm["std"]), net)


def build_loss(cfg: Train) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_optimizer(model: nn.Module, cfg: Train) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_model(params: Params, weights: Path) -> nn.Sequential:
    """The model of `params` with the weights saved at `weights` (a state dict)."""
    made_by = "build" if weights == INIT else "train"
    state = load_torch(weights, made_by=made_by)
    model = build_model(params.build, read_json(MANIFEST, made_by="prepare"))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{weights} does not fit the model that params describe (build.model={params.build.model}; {first[:150]}): "
            f"it was made with other build params; make it again with `dvc repro {made_by}`, "
            "or do not override build.* for this stage alone"
        ) from None
    return model


def run(params: Params) -> dict:
    manifest = read_json(MANIFEST, made_by="prepare")
    torch.manual_seed(params.seed)
    model = build_model(params.build, manifest)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "model": params.build.model,
        "parameters": n_params,
        "input_shape": manifest["input_shape"],
        "classes": len(manifest["classes"]),
        "architecture": str(model),
    }
    with staged(INIT, SUMMARY) as (init, summary_file):
        save_torch(model.state_dict(), init)
        summary_file.write_text(json_text(summary))
    print(f"build: {params.build.model} with {n_params:,} parameters")
    return {"init": str(INIT), "summary": str(SUMMARY), "parameters": n_params}
