"""Reading inputs and writing outputs so that no failure or kill leaves a half-written or mixed result.

A step writes all of its outputs into hidden staging folders beside their final places
(`.<pid>.<random>.tmp/`, same file system, same file names), does everything that can still fail
(the MLflow logging included), and only then moves each file into place with one rename. A crash
or a kill before that leaves every previous output untouched; the next step that writes into the
same folder removes the staging folders of processes that no longer exist.

Inputs are read with one-line errors that name the file and how to get it back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import InputError, OutputError

STAGING_SUFFIX = ".tmp"  # ignored by git (.gitignore: *.tmp)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep(folder: Path) -> None:
    """Remove staging folders left in `folder` by processes that were killed."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(STAGING_SUFFIX) and entry.is_dir()):
            continue
        pid = name[1:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _no_space_hint(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "; free some disk space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; make the folder writable and run again"
    return ""


@contextmanager
def staged(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary paths with the targets' names; all moved onto the targets at the end, only on success.

    Log the staged files to MLflow inside the block: a logging failure then leaves the targets as
    they were, and the artifacts keep their final names.
    """
    targets = [Path(p) for p in paths]
    folders: dict[Path, Path] = {}
    try:
        for target in targets:
            parent = target.parent
            if parent not in folders:
                parent.mkdir(parents=True, exist_ok=True)
                sweep(parent)
                folders[parent] = Path(tempfile.mkdtemp(prefix=f".{os.getpid()}.", suffix=STAGING_SUFFIX, dir=parent))
    except OSError as exc:
        _cleanup(folders.values())
        raise OutputError(f"cannot write into {exc.filename or parent}: {exc.strerror}{_no_space_hint(exc)}") from None
    temps = [folders[t.parent] / t.name for t in targets]
    try:
        yield temps
        for temp, target in zip(temps, targets, strict=True):
            os.replace(temp, target)
    except OSError as exc:
        where = str(exc.filename or "")
        if not any(where.startswith(str(f)) or where == str(t) for f in folders.values() for t in targets):
            raise
        target = next((t for t, tmp in zip(targets, temps, strict=True) if where in (str(tmp), str(t))), targets[0])
        raise OutputError(f"cannot write {target}: {exc.strerror}{_no_space_hint(exc)}") from None
    finally:
        _cleanup(folders.values())


def _cleanup(folders: Any) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """One staged output: a temporary path that replaces `path` in one rename on success."""
    with staged(path) as (temp,):
        yield temp


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json_text(obj))


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` into `path` (a staged temporary path, usually), byte-for-byte reproducibly.

    Saved to an open file rather than a path: torch names the archive inside after the file, and
    the temporary file's name must not leak into the bytes (same weights, same file hash).
    """
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def require(path: str | Path, made_by: str) -> Path:
    """`path`, or an InputError telling which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} is missing: run the '{made_by}' stage first (dvc repro {made_by})")
    return path


def _unreadable(path: Path, made_by: str, reason: str) -> InputError:
    return InputError(
        f"{path} is unreadable ({reason}); restore it with `dvc checkout {path}`, or make it again with `dvc repro`"
        f" (stage '{made_by}')"
    )


def read_json(path: str | Path, made_by: str) -> Any:
    path = require(path, made_by)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, made_by, f"not valid JSON: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise _unreadable(path, made_by, exc.strerror or str(exc)) from None


def load_torch(path: str | Path, made_by: str) -> Any:
    """`torch.load(weights_only=True)` of a stage's output, with one-line errors for corrupt files.

    `weights_only` refuses anything but tensors and plain values, so a planted pickle cannot run.
    """
    import pickle

    import torch

    path = require(path, made_by)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # a well-formed file that names Python objects to build: what a planted payload is
            reason = "it holds objects other than tensors, refused: loading them could run code"
        else:
            reason = "corrupt or truncated: not a file that torch.save wrote"
        raise _unreadable(path, made_by, reason) from None
    except Exception as exc:  # torch reports a damaged archive as RuntimeError, OSError, EOFError, IndexError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _unreadable(path, made_by, f"corrupt or truncated: {first[:120]}") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
