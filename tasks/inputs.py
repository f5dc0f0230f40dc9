"""Reading earlier stages' outputs back: the manifest, a split's dataset, a model with its weights.

Every reader names the stage that makes the file and says how to get it back when it is missing,
corrupt or from another version of the pipeline, in one line (an `InputError`, exit code 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import paths
from tasks.errors import InputError
from tasks.files import file_hashes, load_array, load_torch, read_json
from tasks.params import Params


def manifest() -> dict[str, Any]:
    data = read_json(paths.MANIFEST, made_by="prepare")
    if not isinstance(data, dict) or "input_shape" not in data or "classes" not in data:
        raise InputError(
            f"{paths.MANIFEST} was not made by this version of prepare; make it again with `dvc repro prepare`"
        )
    return data


def split_record(split: str) -> dict[str, Any]:
    """What identifies a split: its files, their DVC hashes (md5, from the manifest or computed), its size.

    The images file's md5 is the split's digest: the MLflow dataset input's, and what the registry
    compares before it compares two models' test metrics.
    """
    data = manifest()
    known = data.get("md5", {})
    md5 = {p: known.get(p.name) or file_hashes(p, "md5")["md5"] for p in (paths.images(split), paths.labels(split))}
    name = Path(data["root"]).name if data["dataset"] == "imagefolder" and data.get("root") else data["dataset"]
    return {
        "name": f"{name}-{split}",
        "split": split,
        "digest": md5[paths.images(split)],
        "files": {str(p): h for p, h in md5.items()},
        "rows": sum(data.get("counts", {}).get(split, {}).values()),
        "shape": data["input_shape"],
        "classes": len(data["classes"]),
    }


def dataset(split: str, transform=None, seed: int = 0):
    """The split's `ImageArrays` (memory-mapped), each file checked to be readable first."""
    from tasks.core.data import ImageArrays

    images = load_array(paths.images(split), "prepare", ndim=4)
    labels = load_array(paths.labels(split), "prepare", ndim=1)
    if images.shape[0] != labels.shape[0] or images.dtype != "uint8":
        raise InputError(
            f"{paths.images(split)} ({images.dtype} {images.shape}) and {paths.labels(split)} ({labels.shape[0]} "
            "labels) do not belong together; make them again with `dvc repro prepare`"
        )
    return ImageArrays(paths.images(split), paths.labels(split), transform, seed)


def build_model(params: Params, data: dict[str, Any], pretrained: bool = False):
    """The model that `params.build` describes, shaped for the manifest's data, with fresh weights.

    `pretrained`: start from the file `build.weights` names (the build step); otherwise the weights
    are seeded random ones, to be replaced by a saved state dict. `build.freeze_backbone` applies
    either way: which parameters train is not in a state dict.
    """
    from tasks.core.models import build_model as build

    cfg = params.build
    weights = None
    if pretrained and cfg.weights is not None:
        weights = Path(cfg.weights)
        if not weights.is_file():
            raise InputError(
                f"build.weights: {weights} does not exist (or is not a file); nothing is downloaded: get the "
                f"weights file with a network (e.g. torchvision.models.get_model_weights('{cfg.model}').DEFAULT.url) "
                "and point build.weights at it, or set it to null for random weights"
            )
    return build(
        cfg.model,
        data["input_shape"],
        len(data["classes"]),
        data["normalisation"],
        channels=cfg.channels,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        weights=weights,
        freeze_backbone=cfg.freeze_backbone,
    )


def model(params: Params, weights: Path, made_by: str):
    """The model of `params` with the weights saved at `weights` (a state dict)."""
    state = load_torch(weights, made_by=made_by)
    net = build_model(params, manifest())
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{weights} does not fit the model that params describe (build.model={params.build.model}; {first[:150]}): "
            f"it was made with other build params or data; make it again with `dvc repro {made_by}`, "
            "or do not override build.* for this stage alone"
        ) from None
    return net
