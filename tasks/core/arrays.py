"""The data as numpy arrays, before PyTorch sees it: the stratified split, per-channel statistics, chunk sizes.

numpy and scikit-learn only, no torch: prepare imports this and not `data`, so that a `dvc repro`
of prepare on data that is already arrays (the digits, MNIST's files) does not import torch (about
1.2-1.8 s).
"""

from __future__ import annotations

import numpy as np

from tasks.errors import DataError


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted indices per split, stratified by label and fixed by the seed; test_fraction 0: no test split."""
    from sklearn.model_selection import train_test_split

    index = np.arange(labels.shape[0])
    try:
        if test_fraction:
            rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        else:
            rest, test = index, index[:0]
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:  # a split too small to hold every class
        raise DataError(f"cannot split {labels.shape[0]} images stratified: {exc}; raise the fraction") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def rows_per_chunk(images: np.ndarray, budget: int = 32 << 20) -> int:
    """How many images of this array make about `budget` bytes: chunks sized by bytes, not counts."""
    return max(1, budget // max(1, int(np.prod(images.shape[1:])) * images.itemsize))


def channel_stats(images: np.ndarray, index: np.ndarray, max_value: int) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel on the [0, 1] scale of `images[index]`, read in chunks.

    The array may be memory-mapped and larger than memory: only one chunk is read at a time.
    """
    n, c = index.size, images.shape[1]
    chunk = rows_per_chunk(images)  # 32 MB of uint8 at a time: 256 MB as float64
    total = np.zeros(c)
    squares = np.zeros(c)
    for start in range(0, n, chunk):
        part = images[index[start : start + chunk]].astype(np.float64) / max_value
        total += part.sum(axis=(0, 2, 3))
        squares += (part**2).sum(axis=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = np.maximum(squares - count * mean**2, 0) / max(count - 1, 1)  # unbiased, as torch.std
    # A channel that never changes has no spread to divide by; one grey level keeps Normalize finite.
    return [float(m) for m in mean], [max(float(s), 1 / max_value) for s in np.sqrt(var)]
