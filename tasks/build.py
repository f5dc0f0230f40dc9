"""build: the model and its seeded initial weights, shaped for the prepared data.

    python -m tasks build            # or: dvc repro build

Writes `models/build/init.pt` (the initial state dict) and `models/build/summary.json`
(architecture, parameter count). The architecture (`tasks/core/models.py`) takes the manifest's
channels, image size and classes; its first layer holds the train split's normalisation, so
every saved or exported model takes raw pixels.
"""

from __future__ import annotations

import torch

from tasks import BY_HAND, StepContext, inputs, paths
from tasks.files import json_text, save_torch, staged
from tasks.params import Params


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    manifest = inputs.manifest()
    torch.manual_seed(params.seed)
    model = inputs.build_model(params, manifest)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "model": params.build.model,
        "parameters": n_params,
        "input_shape": manifest["input_shape"],
        "classes": len(manifest["classes"]),
        "architecture": str(model),
    }
    with staged(paths.INIT, paths.SUMMARY) as (init, summary_file):
        save_torch(model.state_dict(), init)
        summary_file.write_text(json_text(summary))
    print(f"build: {params.build.model} with {n_params:,} parameters")
    return {"init": str(paths.INIT), "summary": str(paths.SUMMARY), "parameters": n_params}
