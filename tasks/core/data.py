"""The prepared data as PyTorch sees it: a memory-mapped `Dataset`, the epoch sampler, augmentation, loaders.

Each split is one uint8 array of images (N, C, H, W) and one int64 array of labels, in `.npy`
files opened with `numpy.load(mmap_mode="r")`: the operating system pages in the batches being
read, so the process's own memory stays flat however large the data grows (the pages read count
as page cache, which the kernel can drop; `benchmarks/input_path.py` measures both). A batch is one fancy-index read
of the array (`__getitems__`, which `DataLoader` uses when a dataset has it); augmentation then
runs per sample on uint8 tensors with `torchvision.transforms.v2`, so each image gets its own
random crop, flip, rotation and colour change. Models take raw pixels as float32 and normalise
them themselves (see `tasks.core.models.Normalize`).

Determinism, and why it makes resuming exact: an epoch's order is a function of (seed, epoch)
alone (`EpochSampler`, as `DistributedSampler` does), and each sample's augmentation is drawn
from a generator seeded with (seed, epoch, index). Nothing about the data depends on what ran
before, on the number of `DataLoader` workers or on how many processes share the epoch, so a
run resumed at epoch 7 (or at batch 120 of it) sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.core.processes import forkserver_context
from tasks.errors import DataError


def augmentation(size: int, crop_scale: float, hflip: float, rotation: float, color_jitter: float):
    """`torchvision.transforms.v2` on one uint8 (C, H, W) image; None when every knob is off."""
    if crop_scale >= 1 and hflip <= 0 and rotation <= 0 and color_jitter <= 0:
        return None  # without importing torchvision (about 0.3 s)
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
    return v2.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, sample): the augmentation of a sample is fixed by them alone."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler):
    """This process's share of an epoch, as `(epoch, index)` pairs, in an order fixed by (seed, epoch).

    Like `DistributedSampler`: with `replicas` processes, each takes every `replicas`-th sample of
    the epoch's permutation, the permutation padded with its own start so that all get as many
    (DDP needs equal batch counts). `set_epoch(epoch, skip)` picks the epoch and leaves out its
    first `skip` samples of this process: what a resume from the middle of an epoch needs.
    The epoch travels with each index so that the dataset seeds that sample's augmentation.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, replicas: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.replicas = n, seed, shuffle, rank, replicas
        self.per_replica = math.ceil(n / replicas)
        self.epoch, self.skip = 1, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        total = self.per_replica * self.replicas
        order += order[: total - self.n]  # pad by wrapping around: every process gets as many
        mine = order[self.rank : total : self.replicas]
        return ((self.epoch, i) for i in mine[self.skip :])

    def __len__(self) -> int:
        return self.per_replica - self.skip


class ImageArrays(Dataset):
    """Images and labels of one split, from memory-mapped `.npy` files, as uint8 (C, H, W) tensors.

    Indices are plain ints, or `(epoch, index)` pairs from `EpochSampler`: then each sample's
    augmentation is drawn from its own generator state, seeded by (seed, epoch, index), inside
    `fork_rng` so that torch's global generator (dropout) is left as it was.
    """

    def __init__(self, images: Path, labels: Path, transform=None, seed: int = 0) -> None:
        self.images_path, self.labels_path, self.transform = Path(images), Path(labels), transform
        self.seed = seed
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

    def __getitems__(self, indices: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch with one read of the mapped array, in the order asked for."""
        pairs = bool(indices) and isinstance(indices[0], tuple)
        index = np.asarray([i for _, i in indices] if pairs else indices, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        y = torch.from_numpy(np.asarray(self._labels[index], dtype=np.int64))
        if self.transform is not None:
            epochs = [e for e, _ in indices] if pairs else [0] * len(indices)
            with torch.random.fork_rng(devices=[]):
                out = []
                for sample, epoch, i in zip(x, epochs, index.tolist(), strict=True):
                    torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                    out.append(self.transform(sample))
            x = torch.stack(out)
        return x, y


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already made the batch


def loader(
    dataset: ImageArrays,
    batch_size: int,
    sampler: EpochSampler | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A `DataLoader` over whole batches, in `sampler`'s order (else in file order), workers living across epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        # Its own generator: each new iterator draws a seed from it, and drawing from torch's global
        # generator instead would change the dropout of the epochs that follow.
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=_as_batch,
        multiprocessing_context=forkserver_context() if workers > 0 else None,
    )
