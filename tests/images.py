"""Image folders made from scikit-learn's digits, with the defects users' folders really have.

Nothing is downloaded: every image is one of the 1,797 8x8 digits, scaled to 0-255, tinted to
RGB, upscaled to a random size and saved as PNG or JPEG in torchvision's ImageFolder layout.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(per_class: int, classes: int = 10, seed: int = 0) -> list[tuple[int, Image.Image]]:
    """(label, RGB image of 32 to 48 pixels a side) for the first `per_class` digits of each class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for label in range(classes):
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            grey = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
            tint = rng.uniform(0.6, 1.0, size=3)
            rgb = np.stack([(grey * t).astype(np.uint8) for t in tint], axis=-1)
            w, h = (int(v) for v in rng.integers(32, 49, size=2))
            out.append((label, Image.fromarray(rgb, "RGB").resize((w, h), Image.Resampling.BILINEAR)))
    return out


def image_folder(root: Path, per_class: int = 30, classes: int = 10, seed: int = 0) -> list[str]:
    """`root/<class>/<n>.png|jpg`, PNG and JPEG alternating; returns the files, relative to root."""
    files = []
    for n, (label, image) in enumerate(digit_images(per_class, classes, seed)):
        rel = f"{label}/{n:04d}.{'png' if n % 2 else 'jpg'}"
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(root / rel, quality=95) if rel.endswith("jpg") else image.save(root / rel)
        files.append(rel)
    return files


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def add_defect(root: Path, kind: str, outside: Path) -> str:
    """Put one bad file of `kind` into the folder; returns its path relative to root."""
    some = sorted((root / "1").iterdir())[0]
    sample = Image.open(some).convert("RGB")
    target = root / "1" / f"bad-{kind}.png"
    if kind == "truncated":
        target = target.with_suffix(".jpg")
        data = encoded(sample, "JPEG")
        target.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        data = bytearray(encoded(sample, "PNG"))
        data[40:200] = random.Random(40).randbytes(160)  # a valid signature and header, then fixed garbage
        target.write_bytes(bytes(data))
    elif kind == "not_an_image":
        target = target.with_suffix(".txt")
        target.write_text("notes about this class\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "too_many_pixels":
        Image.new("L", (400, 400), 128).save(target)  # 160,000 pixels: over the limit the test sets
    elif kind == "symlink_outside":
        outside.parent.mkdir(parents=True, exist_ok=True)
        sample.save(outside)
        target.symlink_to(outside)
    elif kind == "duplicate":
        target = root / "2" / f"copy-of-{some.name}"
        target.write_bytes(some.read_bytes())
    elif kind == "unreadable":
        sample.save(target)
        target.chmod(0)
    else:
        raise ValueError(kind)
    return target.relative_to(root).as_posix()


def write_idx(raw: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """MNIST's IDX format: big-endian magic, dimensions, then the uint8 data."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes())


def mnist_root(root: Path, folder: str = "MNIST") -> Path:
    """torchvision's MNIST layout (`root/MNIST/raw/*-ubyte`) holding the digits, upscaled to 16x16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack(
        [np.asarray(Image.fromarray((d * (255 / 16)).round().astype(np.uint8)).resize((16, 16))) for d in digits.images]
    )
    cut = 1500
    write_idx(root / folder / "raw", images[:cut], digits.target[:cut], "train")
    write_idx(root / folder / "raw", images[cut:], digits.target[cut:], "t10k")
    return root
