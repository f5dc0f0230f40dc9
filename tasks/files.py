"""Writing outputs so that a crash never leaves a half-written file: write beside, then rename."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (so the rename is atomic) and same suffix (torch.export.save wants ".pt2").
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def require(path: str | Path, made_by: str) -> Path:
    """`path`, or a FileNotFoundError telling which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the '{made_by}' stage first (dvc repro {made_by})")
    return path


def read_json(path: str | Path, made_by: str) -> Any:
    return json.loads(require(path, made_by).read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save`, atomically and byte-for-byte reproducibly.

    Saved to an open file rather than a path: torch names the archive inside after the file, and
    the temporary file's name must not leak into the bytes (same weights, same file hash).
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
