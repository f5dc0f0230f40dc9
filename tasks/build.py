"""build: the model and its seeded initial weights, shaped for the prepared data.

    python -m tasks build            # or: dvc repro build

Writes `models/build/init.pt` (the initial state dict) and `models/build/summary.json`
(architecture, parameter counts; the file and sha256 of `build.weights` when a torchvision model
starts from one, a local file, never downloaded). The architecture (`tasks/core/models.py`) takes
the manifest's channels, image size and classes; its first layer holds the train split's
normalisation, so every saved or exported model takes raw pixels.
"""

from __future__ import annotations

import torch

from tasks import BY_HAND, StepContext, inputs, paths
from tasks.files import json_text, save_torch, sha256_file, staged
from tasks.params import Params


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    manifest = inputs.manifest()
    torch.manual_seed(params.seed)
    model = inputs.build_model(params, manifest, pretrained=True)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "model": params.build.model,
        "parameters": n_params,
        "trainable_parameters": trainable,
        "input_shape": manifest["input_shape"],
        "classes": len(manifest["classes"]),
    }
    if params.build.weights is not None:
        summary["weights"] = {"path": params.build.weights, "sha256": sha256_file(params.build.weights)}
    summary["architecture"] = str(model)
    with staged(paths.INIT, paths.SUMMARY) as (init, summary_file):
        save_torch(model.state_dict(), init)
        summary_file.write_text(json_text(summary))
    frozen = f" ({trainable:,} trainable)" if trainable != n_params else ""
    start = f", starting from {params.build.weights}" if params.build.weights is not None else ""
    print(f"build: {params.build.model} with {n_params:,} parameters{frozen}{start}")
    return {
        "init": str(paths.INIT),
        "summary": str(paths.SUMMARY),
        "parameters": n_params,
        "trainable_parameters": trainable,
    }
