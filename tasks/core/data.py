"""The prepared data as PyTorch sees it: a stratified split, a memory-mapped `Dataset`, augmentation, loaders.

Each split is one uint8 array of images (N, C, H, W) and one int64 array of labels, in `.npy`
files opened with `numpy.load(mmap_mode="r")`: the operating system pages in the batches being
read, so the process's own memory stays flat however large the data grows (the pages read count
as page cache, which the kernel can drop; `benchmarks/input_path.py` measures both). A batch is one fancy-index read
of the array (`__getitems__`, which `DataLoader` uses when a dataset has it); augmentation then
runs per sample on uint8 tensors with `torchvision.transforms.v2`, so each image gets its own
random crop, flip, rotation and colour change. Models take raw pixels as float32 and normalise
them themselves (see `tasks.core.models.Normalize`).

Determinism: shuffling uses the loader's own seeded generator; augmentation draws from torch's
global generator, which is seeded by the training seed in the main process and, in worker
processes, by the `DataLoader` from that same generator. Same seed and same `num_workers`, same
batches; a different number of workers draws the augmentation in another order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.core.processes import forkserver_context
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


def augmentation(size: int, crop_scale: float, hflip: float, rotation: float, color_jitter: float):
    """`torchvision.transforms.v2` on one uint8 (C, H, W) image; None when every knob is off."""
    from torchvision.transforms import v2

    steps = []
    if crop_scale < 1:
        steps.append(v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose(steps) if steps else None


class ImageArrays(Dataset):
    """Images and labels of one split, from memory-mapped `.npy` files, as uint8 (C, H, W) tensors."""

    def __init__(self, images: Path, labels: Path, transform=None) -> None:
        self.images_path, self.labels_path, self.transform = Path(images), Path(labels), transform
        self._images: np.ndarray | None = None
        self._labels = np.load(self.labels_path, mmap_mode="r")
        shape = np.load(self.images_path, mmap_mode="r").shape
        if len(shape) != 4 or shape[0] != self._labels.shape[0]:
            raise DataError(f"{images} holds {shape}, and {labels} {self._labels.shape[0]} labels: make them again")
        self.shape = shape

    @property
    def images(self) -> np.ndarray:
        # Opened on first use in each process, so DataLoader workers map the file themselves.
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_labels": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._labels = np.load(self.labels_path, mmap_mode="r")

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch with one read of the mapped array, in the order asked for."""
        index = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        y = torch.from_numpy(np.asarray(self._labels[index], dtype=np.int64))
        if self.transform is not None:
            x = torch.stack([self.transform(sample) for sample in x])
        return x, y


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already made the batch


def loader(
    dataset: ImageArrays,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A `DataLoader` over whole batches: seeded shuffling, workers that live across epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        # Its own generator even unshuffled: each new iterator draws a seed from it, and drawing from
        # torch's global generator instead would change the dropout of the epochs that follow.
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=_as_batch,
        multiprocessing_context=forkserver_context() if workers > 0 else None,
    )
