"""Raw data: what each source holds, and decoding every image once into a fixed size and channels.

Three kinds of source:

- `digits`: scikit-learn's handwritten digits, shipped with the package (8x8, values 0-16).
- `mnist`, `fashion_mnist`: torchvision's readers of the IDX files under `<root>/MNIST/raw/`
  (or `FashionMNIST/raw/`); torchvision downloads them only when asked to.
- `imagefolder`: torchvision's `ImageFolder` layout, `<root>/<class>/<image>`, or the same under
  `<root>/train`, `<root>/val` and `<root>/test` for splits made by the user.

Images are decoded by `serve.preprocess` (Pillow, EXIF orientation, grey or RGB, torchvision's
antialiased resize), the code that the prediction command and the model server use on the images
they are asked about, so an image gets the same pixels in training and in use. A file that cannot
be used gets a reason, never an exception: the caller decides whether that stops the run or
leaves the file out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve import preprocess
from serve.preprocess import Decoded, ignored
from tasks.errors import DataError

SPLITS = ("train", "val", "test")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Arrays:
    """A source that is already arrays: images (N, C, H, W) uint8, labels (N,), and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    max_value: int
    split: list[str] | None = None  # given splits ("train"/"test"), or None: the pipeline splits


@dataclass
class Folder:
    """An image folder, scanned: one entry per file to decode, and the problems found on the way."""

    root: Path
    classes: list[str]
    files: list[str] = field(default_factory=list)  # relative to root, posix
    labels: list[int] = field(default_factory=list)
    split: list[str] | None = None
    problems: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    empty_classes: list[str] = field(default_factory=list)


def digits() -> Arrays:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images[:, None, :, :]
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise DataError("scikit-learn's digits are not whole numbers in 0..16: is scikit-learn damaged?")
    return Arrays(images.astype(np.uint8), data.target.astype(np.int64), [str(n) for n in data.target_names], 16)


def mnist(root: Path, fashion: bool, download: bool) -> Arrays:
    """MNIST or FashionMNIST from their IDX files: the given train set (split later into train and val) and test."""
    from torchvision.datasets import MNIST, FashionMNIST

    kind = FashionMNIST if fashion else MNIST
    raw = root / kind.__name__ / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and not download:
        have_gz = all((raw / f"{name}.gz").is_file() for name in missing)
        hint = f"unpack them there (gunzip {raw}/*.gz)" if have_gz else f"place the four IDX files in {raw}/"
        raise DataError(
            f"prepare.dataset is '{'fashion_mnist' if fashion else 'mnist'}' but {raw} lacks "
            f"{', '.join(missing)}: {hint}, or set prepare.download: true to let torchvision fetch them"
        )
    parts = []
    for train in (True, False):
        try:
            ds = kind(str(root), train=train, download=download)
        except (RuntimeError, OSError, ValueError, AssertionError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read the {kind.__name__} files in {raw}: {first[:200]}") from None
        parts.append((ds.data.numpy(), ds.targets.numpy().astype(np.int64), "train" if train else "test"))
    images = np.concatenate([p[0] for p in parts])[:, None, :, :]
    labels = np.concatenate([p[1] for p in parts])
    split = [name for p in parts for name in [p[2]] * len(p[1])]
    return Arrays(np.ascontiguousarray(images), labels, list(kind.classes), 255, split)


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not ignored(e.name))


def _walk(folder: Path, problems: dict[str, str], root: Path) -> Iterator[Path]:
    """Every non-hidden file under `folder`, in sorted order.

    Symlinked subfolders are not followed (they could loop, or lead anywhere): each is a problem,
    as is a folder that cannot be listed.
    """

    def unreadable(exc: OSError) -> None:
        problems[Path(exc.filename).relative_to(root).as_posix() + "/"] = f"cannot read the folder ({exc.strerror})"

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        here = Path(dirpath)
        for d in [d for d in dirnames if (here / d).is_symlink() and not ignored(d)]:
            problems[(here / d).relative_to(root).as_posix() + "/"] = "a symlinked folder: not followed"
        dirnames[:] = sorted(d for d in dirnames if not ignored(d) and not (here / d).is_symlink())
        for name in sorted(filenames):
            if not ignored(name):
                yield here / name


def _inside(path: Path, real_root: Path) -> str | None:
    """Why `path` (a symlink, or inside one) cannot be used, or None when it resolves inside the root."""
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return f"broken symlink (to {os.readlink(path) if path.is_symlink() else path})"
    except (OSError, RuntimeError) as exc:  # a symlink loop, a folder we may not enter
        return f"cannot follow the symlink ({getattr(exc, 'strerror', None) or exc})"
    if not target.is_relative_to(real_root):
        return f"symlink pointing outside the data root (to {target})"
    return None


def scan_folder(root: Path) -> Folder:
    """The files of an image folder with their class (and split, when given), and what is wrong on the way."""
    if not root.is_dir():
        raise DataError(
            f"prepare.root {root} is not a folder: put the images in {root}/<class>/<image>, "
            f"or point prepare.root at where they are"
        )
    top = _class_folders(root)
    given = [s for s in SPLITS if s in top]
    if given and set(top) - set(SPLITS):
        others = ", ".join(sorted(set(top) - set(SPLITS)))
        raise DataError(
            f"{root} mixes split folders ({', '.join(given)}) with class folders ({others}): "
            "use either <root>/<class>/ or <root>/train|val|test/<class>/"
        )
    if given and given != list(SPLITS):
        lacking = [s for s in SPLITS if s not in given]
        raise DataError(
            f"{root} has {', '.join(f'{s}/' for s in given)} but no {', '.join(f'{s}/' for s in lacking)}: "
            "splits made by hand need all three folders; or put the class folders directly in the root"
        )
    if given:
        classes = _class_folders(root / "train")
        extra = sorted({c for s in ("val", "test") for c in _class_folders(root / s)} - set(classes))
        if extra:
            raise DataError(f"{root}: classes {extra} are in val/ or test/ but not in train/, so cannot be learnt")
    else:
        classes = top
    if not classes:
        raise DataError(f"{root} has no class folders: expected {root}/<class>/<image> (folder names are classes)")

    found = Folder(root, classes, split=[] if given else None)
    real_root = root.resolve()
    for split in given or [None]:
        base = root / split if split else root
        for label, name in enumerate(classes):
            folder = base / name
            rel_folder = folder.relative_to(root).as_posix() + "/"
            if not folder.is_dir():
                continue
            if (folder.is_symlink() or base.is_symlink()) and (why := _inside(folder, real_root)):
                found.problems[rel_folder] = f"class folder: {why}"
                continue
            count = 0
            for path in _walk(folder, found.problems, root):
                rel = path.relative_to(root).as_posix()
                count += 1
                if path.is_symlink() and (why := _inside(path, real_root)):
                    found.problems[rel] = why
                    continue
                if not path.is_file():
                    found.problems[rel] = "not a regular file (a pipe, socket or device)"
                    continue
                found.files.append(rel)
                found.labels.append(label)
                if found.split is not None:
                    found.split.append(split)
            if count == 0 and split in (None, "train") and rel_folder not in found.problems:
                found.empty_classes.append(rel_folder)
    return found


def decode(root: Path, rel: str, channels: int, size: int, policy: str, max_pixels: int) -> Decoded:
    """Read, check and decode one file (`serve.preprocess.decode`, which serving uses too)."""
    try:
        data = (root / rel).read_bytes()
    except OSError as exc:
        return Decoded(None, reason=f"cannot read it ({exc.strerror or exc})")
    return preprocess.decode(data, channels, size, policy, max_pixels, "prepare.max_image_pixels")


def _decode_many(args: tuple) -> list[Decoded]:
    import torch  # decoding resizes with torchvision: torch is needed here, not for data that is arrays already

    root, rels, channels, size, policy, max_pixels = args
    torch.set_num_threads(1)  # one process per core already
    return [decode(root, rel, channels, size, policy, max_pixels) for rel in rels]


def decode_folder(
    folder: Folder,
    channels: int,
    size: int,
    policy: str,
    max_pixels: int,
    workers: int,
    out: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> list[Decoded]:
    """Decode every file of `folder` into `out[i]` (N, C, size, size), in parallel processes, in order.

    The results come back in the files' order whatever the number of processes, so the same files
    give the same arrays. What is returned holds no pixels (those are in `out`), only sizes,
    hashes and reasons.
    """
    chunk = 64
    jobs = [
        (folder.root, folder.files[i : i + chunk], channels, size, policy, max_pixels)
        for i in range(0, len(folder.files), chunk)
    ]
    results: list[Decoded] = []

    def take(batch: list[Decoded]) -> None:
        for d in batch:
            if d.image is not None:
                out[len(results)] = d.image
                d.image = None
            results.append(d)
        if progress:
            progress(len(results))

    if workers <= 1 or len(jobs) <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for job in jobs:
                take(_decode_many(job))
        finally:
            torch.set_num_threads(threads)
    else:
        from concurrent.futures import ProcessPoolExecutor

        from tasks.core.processes import forkserver_context

        with ProcessPoolExecutor(workers, mp_context=forkserver_context()) as pool:
            for batch in pool.map(_decode_many, jobs):
                take(batch)
    return results
