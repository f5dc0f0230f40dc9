"""One image file's bytes to the pixels a model takes: the code that `prepare` and serving share.

`prepare` decodes the training images with `decode`; the prediction command, the batch-scoring
flow and the HTTP server decode the images they are asked about with the same function and the
same settings, which the export records in `model.json` under `preprocess`. So an image gets the
same pixels in training and in use: the same EXIF turn, mode conversion, channel count, resize
policy and antialiasing.

Images are decoded with Pillow (any format it reads), turned upright by their EXIF orientation,
converted to grey or RGB (palette, RGBA, 16-bit, CMYK and greyscale included) and resized with
torchvision's antialiased resize on uint8 tensors. A file that cannot be used gets a reason,
never an exception: the caller decides whether that stops a run, leaves the file out, or becomes
one row of an error in the predictions.

Imports torch, torchvision, Pillow and numpy only (never the project's `tasks`): a model server
needs the export's files and this package, nothing else.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch  # imported by the functions that need it: prepare on the digits needs none

_PILLOW_LIMIT = threading.Lock()
IGNORED = {"Thumbs.db", "desktop.ini", "__MACOSX"}  # besides hidden files (".DS_Store", "._photo.jpg")
SIGNATURES = {  # how image files begin: to tell a damaged image from a file that is no image at all
    b"\x89PNG": "PNG",
    b"\xff\xd8": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WebP",
}


def ignored(name: str) -> bool:
    """A file or folder name that is never an image to learn from or to score: hidden, or the OS's own."""
    return name.startswith(".") or name in IGNORED


@dataclass
class Decoded:
    """One file's result: the image (uint8, C x H x W), or the reason it cannot be used."""

    image: np.ndarray | None
    width: int = 0
    height: int = 0
    sha256: str = ""
    reason: str = ""


def changes(shape: tuple[int, ...], channels: int, size: int | None) -> bool:
    """Whether `fit` changes images of this (C, H, W) or (N, C, H, W) shape: their channels or their size."""
    h, w = shape[-2:]
    return shape[-3] != channels or (size is not None and (h != size or w != size))


def fit(image: torch.Tensor, channels: int, size: int | None, policy: str) -> torch.Tensor:
    """A uint8 (C, H, W) or (N, C, H, W) tensor with `channels` channels and `size` x `size` pixels.

    `crop` resizes the shorter side to `size` and cuts the middle; `pad` resizes the longer side
    and pads with black; `stretch` resizes each side on its own, ignoring the aspect ratio.
    """
    h, w = image.shape[-2:]
    if not changes(tuple(image.shape), channels, size):
        return image.contiguous()  # the digits and MNIST as they come: no torchvision import (about 1 s)
    from torchvision.transforms.v2 import functional as F

    if image.shape[-3] != channels:
        image = F.rgb_to_grayscale(image) if channels == 1 else image.expand(*image.shape[:-3], 3, -1, -1)
    if size is None or (h == size and w == size):
        return image.contiguous()
    if policy == "stretch":
        return F.resize(image, [size, size], antialias=True)
    if policy == "crop":  # the central square first: resizing a 1x40000 strip first would make it huge
        side = min(h, w)
        return F.resized_crop(image, (h - side) // 2, (w - side) // 2, side, side, [size, size], antialias=True)
    scale = size / max(h, w)
    resized = F.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return F.center_crop(resized, [size, size])  # pads with zeros around the smaller image


def _to_mode(img, channels: int):
    """A Pillow image in L or RGB: 16-bit scaled (not clipped) to 8 bits, transparency dropped as torchvision does."""
    from PIL import Image

    # One rule per mode, never per image: two files of one data set must not get different scales.
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey (older Pillow opens it as "I")
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":  # floating-point grey, taken as 0..1 (the usual convention of float images)
        img = Image.fromarray(np.clip(np.round(np.asarray(img, dtype=np.float64) * 255), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow asks for, instead of a warning
    return img.convert("L" if channels == 1 else "RGB")


def decode(
    data: bytes, channels: int, size: int | None, policy: str, max_pixels: int, limit_name: str = "the pixel limit"
) -> Decoded:
    """Check and decode one file's bytes; every way it can fail becomes a reason (`limit_name` names the limit)."""
    if not data:
        return Decoded(None, reason="empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()  # prepare finds the same image twice by it
    with _PILLOW_LIMIT:  # Pillow's limit is one global: threads (a server's) take turns
        return _decode(data, digest, channels, size, policy, max_pixels, limit_name)


def _decode(data: bytes, digest: str, channels: int, size, policy: str, max_pixels: int, limit_name: str) -> Decoded:
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses at twice this, before decoding; we refuse at once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette notes: handled below
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise Image.DecompressionBombError("")
                img.load()
                try:
                    upright = ImageOps.exif_transpose(img)
                except Exception:  # damaged EXIF data: the pixels are fine, keep them as stored
                    upright = img
                width, height = upright.size
                image = fit(pil_to_tensor(_to_mode(upright, channels)), channels, size, policy).numpy()
    except Image.DecompressionBombError:
        w, h = _header_size(data)
        why = f"{w}x{h} pixels, over {limit_name} ({max_pixels:,}): a decompression bomb, or an image to shrink first"
        return Decoded(None, reason=why)
    except UnidentifiedImageError:
        kind = next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)
        if kind:
            return Decoded(None, reason=f"corrupt: it starts as a {kind} file, but Pillow cannot read it")
        return Decoded(None, reason="not an image (Pillow cannot identify it)")
    except MemoryError:
        return Decoded(None, reason="too large to decode in the memory available")
    except Exception as exc:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Decoded(None, reason=f"truncated or corrupt ({first[:120]})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return Decoded(image, width, height, digest)


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return (0, 0)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_levels(images: np.ndarray, max_value: int) -> np.ndarray:
    """8-bit pixels (0..255) on the model's scale 0..`max_value`, as float32.

    Models take the pixel values their training data had: 0..255 for image files and MNIST, 0..16
    for scikit-learn's digits, whose 17 grey levels an 8-bit image maps back to by rounding
    (`round(p * 16 / 255)`), so a digit saved as an 8-bit image gets its exact training values.
    """
    if max_value == 255:
        return images.astype(np.float32)
    return np.round(images.astype(np.float32) * (max_value / 255)).astype(np.float32)
