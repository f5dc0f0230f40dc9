"""Reading inputs and writing outputs so that no failure or kill leaves a half-written or mixed result.

A step writes all of its outputs into hidden staging folders beside their final places
(`.<pid>-<start>.<random>.tmp/`, same file system, same file names), does everything that can
still fail (the MLflow logging included), and only then moves each file into place with one
rename, with Ctrl-C and SIGTERM held back for that moment. A crash or a kill before that leaves
every previous output untouched; a rename that fails puts back the ones already done; the next
step that writes into the same folder removes the staging folders of processes that no longer
exist.

Inputs are read with one-line errors that name the file and how to get it back.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import InputError, OutputError

STAGING_SUFFIX = ".tmp"  # ignored by git (.gitignore: *.tmp)


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot), on Linux: tells a pid apart from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def process_id(pid: int | None = None) -> str:
    """`<pid>-<start time>` (or just `<pid>` where /proc is missing): one process, never a later one with its pid."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    return f"{pid}-{start}" if start else str(pid)


def process_alive(ident: str) -> bool:
    """Whether the process that `process_id` named still runs (a reused pid does not count)."""
    pid, _, start = ident.partition("-")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return not start or _start_time(int(pid)) in (start, None)


def sweep(folder: Path) -> None:
    """Remove staging folders left in `folder` by processes that were killed."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    me = process_id()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(STAGING_SUFFIX) and entry.is_dir()):
            continue
        owner = name[1:].split(".", 1)[0]
        if owner[:1].isdigit() and owner != me and not process_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "; free some disk space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; make the file and its folder writable (see chmod, chattr -i) and run again"
    return ""


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for a moment (they arrive right after), where a stop would leave a mix."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _commit(temps: list[Path], targets: list[Path]) -> None:
    """Move every staged file onto its target, or, if one move fails, put every target back as it was."""
    previous: list[Path | None] = []
    for temp, target in zip(temps, targets, strict=True):
        keep = temp.with_name(f".{temp.name}.previous")
        try:
            os.link(target, keep)  # a second name for the old file: restoring it is one rename
        except FileNotFoundError:
            keep = None
        except OSError:
            shutil.copy2(target, keep)
        previous.append(keep)
    done: list[int] = []
    try:
        for i, (temp, target) in enumerate(zip(temps, targets, strict=True)):
            os.replace(temp, target)
            done.append(i)
    except OSError:
        for i in reversed(done):
            keep = previous[i]
            if keep is None:
                targets[i].unlink(missing_ok=True)
            else:
                os.replace(keep, targets[i])
        raise


@contextmanager
def staged(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary paths with the targets' names; all moved onto the targets at the end, only on success.

    Log the staged files to MLflow inside the block: a logging failure then leaves the targets as
    they were, and the artifacts keep their final names. If one of the final renames fails, the
    targets already replaced are put back, so the outputs are all new or all old.
    """
    targets = [Path(p) for p in paths]
    folders: dict[Path, Path] = {}
    me = process_id()
    try:
        for target in targets:
            parent = target.parent
            if parent not in folders:
                parent.mkdir(parents=True, exist_ok=True)
                sweep(parent)
                folders[parent] = Path(tempfile.mkdtemp(prefix=f".{me}.", suffix=STAGING_SUFFIX, dir=parent))
    except OSError as exc:
        _cleanup(folders.values())
        raise OutputError(f"cannot write into {exc.filename or parent}: {exc.strerror}{_hint(exc)}") from None
    temps = [folders[t.parent] / t.name for t in targets]
    try:
        yield temps
        with _signals_held():
            _commit(temps, targets)
    except OSError as exc:
        where = str(exc.filename or "")
        ours = [t for t, tmp in zip(targets, temps, strict=True) if where in (str(tmp), str(t))]
        if not ours and exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        what = ours[0] if ours else " / ".join(sorted({str(t.parent) for t in targets}))
        raise OutputError(f"cannot write {what}: {exc.strerror}{_hint(exc)}") from None
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


def csv_cell(text: str) -> str:
    """One CSV field, quoted (and its quotes doubled) when it holds a comma, a quote or a line break."""
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\r\n') else text


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` into `path` (a staged temporary path, usually), byte-for-byte reproducibly."""
    import torch

    write_serialized(path, lambda f: torch.save(obj, f))


def write_serialized(path: str | Path, save: Callable[[io.BytesIO], Any]) -> None:
    """Serialize into memory, then write the bytes to `path` with plain file I/O.

    Two reasons. torch's archive writers name the archive inside after the file they are given:
    a buffer keeps the temporary file's name out of the bytes (same weights, same file hash). And
    on a full disk they fail badly: `torch.save` raises an unexplained RuntimeError, and
    `torch.export.save` aborts the whole process from C++; Python's own write raises ENOSPC, which
    `staged` turns into one line. The cost is one copy of the file in memory while it is written.
    """
    buffer = io.BytesIO()
    save(buffer)
    Path(path).write_bytes(buffer.getbuffer())


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


def load_array(path: str | Path, made_by: str, ndim: int) -> Any:
    """A `.npy` array of a stage's output, memory-mapped read-only, with one-line errors for broken files.

    `allow_pickle` stays off: an array of Python objects is refused, never unpickled.
    """
    import numpy as np

    path = require(path, made_by)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "ValueError"
        if "allow_pickle" in reason:
            reason = "it holds Python objects, refused: loading them could run code"
        else:
            reason = f"corrupt or truncated: {reason[:120]}"
        raise _unreadable(path, made_by, reason) from None
    except (OSError, EOFError) as exc:
        raise _unreadable(path, made_by, f"corrupt or truncated: {getattr(exc, 'strerror', None) or exc}") from None
    if array.ndim != ndim:
        raise _unreadable(path, made_by, f"corrupt: {array.ndim} dimensions where {ndim} belong")
    return array


def sha256_file(path: str | Path) -> str:
    return file_hashes(path, "sha256")["sha256"]


def file_hashes(path: str | Path, *names: str) -> dict[str, str]:
    """Several hashes of one file, read once: {"sha256": ..., "md5": ...}. A file's md5 is its DVC 3 hash."""
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in names}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}
