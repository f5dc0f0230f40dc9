"""prepare: load the data, validate it, split it, and store compact tensors plus a manifest.

    python -m tasks prepare          # or: dvc repro prepare

The default data is scikit-learn's handwritten digits (1,797 images of 8x8 pixels with values
0-16, 10 classes), which ships with the package: nothing is downloaded. The split is stratified
and seeded, so every class keeps its share in train, val and test, and the same seed gives the
same split. Normalisation statistics come from the train split only, so nothing about val or
test leaks into training. Images stay uint8 on disk (one file, a few hundred KB); the model
normalises its own input, so exported models take raw pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from tasks.errors import DataError, InputError
from tasks.files import json_text, load_torch, save_torch, staged
from tasks.params import Params

OUT_DIR = Path("data/prepared")
TENSORS = OUT_DIR / "splits.pt"
MANIFEST = OUT_DIR / "manifest.json"
SPLITS = ("train", "val", "test")


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Images (N, 1, 8, 8) of whole numbers 0-16 (as floats), labels (N,), class names, the largest pixel value."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images[:, None, :, :], digits.target.astype(np.int64), [str(n) for n in digits.target_names], 16


def validate(images: np.ndarray, labels: np.ndarray, classes: list[str], max_value: int, min_per_class: int) -> None:
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(f"expected images (N, C, H, W) and N labels, got {images.shape} and {labels.shape}")
    if images.shape[0] == 0:
        raise DataError("the data set is empty")
    if images.min() < 0 or images.max() > max_value or not np.array_equal(images, np.round(images)):
        raise DataError(f"pixels must be whole numbers in 0..{max_value}; found min {images.min()}, max {images.max()}")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"labels outside 0..{len(classes) - 1}: min {labels.min()}, max {labels.max()}")
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() < min_per_class:
        rare = [classes[i] for i in np.flatnonzero(counts < min_per_class)]
        raise DataError(f"classes {rare} have fewer than {min_per_class} images; a stratified split needs more")


def split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted indices per split, stratified by label and fixed by the seed."""
    index = np.arange(labels.shape[0])
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:  # a split too small to hold every class
        raise DataError(f"cannot split {labels.shape[0]} images stratified: {exc}; raise the fraction") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def run(params: Params) -> dict:
    cfg = params.prepare
    images, labels, classes, max_value = load_digits()
    validate(images, labels, classes, max_value, min_per_class=3)
    images = images.astype(np.uint8)  # checked above: whole numbers in 0..max_value <= 255
    parts = split(labels, cfg.val_fraction, cfg.test_fraction, params.seed)

    tensors: dict[str, torch.Tensor] = {}
    for name in SPLITS:
        tensors[f"{name}_x"] = torch.from_numpy(np.ascontiguousarray(images[parts[name]]))
        tensors[f"{name}_y"] = torch.from_numpy(labels[parts[name]])

    # Statistics of the train split, on the [0, 1] scale, per channel.
    train_x = tensors["train_x"].double() / max_value
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3))

    manifest = {
        "dataset": cfg.dataset,
        "classes": classes,
        "input_shape": list(images.shape[1:]),
        "input_dtype": "uint8",
        "max_value": max_value,
        "normalisation": {
            "scale": 1.0 / max_value,
            "mean": [round(float(m), 8) for m in mean],
            "std": [round(float(s), 8) for s in std],
            "note": "x = (pixels * scale - mean) / std, per channel; the model does this itself",
        },
        "seed": params.seed,
        "counts": {
            name: {
                c: int(n)
                for c, n in zip(classes, np.bincount(labels[parts[name]], minlength=len(classes)), strict=True)
            }
            for name in SPLITS
        },
        "sizes": {name: int(parts[name].shape[0]) for name in SPLITS},
        "sha256": {key: tensor_sha256(t) for key, t in tensors.items()},
    }
    with staged(TENSORS, MANIFEST) as (tensors_file, manifest_file):
        save_torch(tensors, tensors_file)
        manifest_file.write_text(json_text(manifest))
    print(f"prepare: {manifest['sizes']} images of shape {manifest['input_shape']}, {len(classes)} classes")
    return {"tensors": str(TENSORS), "manifest": str(MANIFEST), "sizes": manifest["sizes"]}


def load_split(name: str, path: Path = TENSORS) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of one split."""
    tensors = load_torch(path, made_by="prepare")
    try:
        return tensors[f"{name}_x"], tensors[f"{name}_y"]
    except (KeyError, TypeError):
        raise InputError(
            f"{path} has no '{name}' split: it was not made by this project's prepare; make it again with `dvc repro`"
        ) from None
