"""Checkpoints: everything a killed training needs to go on exactly where it stopped.

A checkpoint is one file, `step-<optimizer steps>-epoch-<epoch>-<sha256 prefix>.pt`, written by
`torch.save` to a temporary file and renamed into place: a kill leaves either the whole file or
none. Its name carries the first 16 hex digits of its own sha256, so a file that was cut short or
changed on disk is told apart from a good one before anything is unpickled, and the previous
checkpoint is used instead. It holds tensors and plain values only (`torch.load` with
`weights_only=True` reads it): the model, optimizer, scheduler and gradient-scaler states, the
counters, every random generator's state (torch, CUDA, Python, numpy) of every process, the best
weights so far, the history of the epochs done, and what produced it.

A killed process loses nothing written: the file is in the operating system's cache. Only a crash
of the machine itself can lose what the disk has not been sent yet, so a checkpoint is flushed to
disk (`fsync`, and the folder's entry) when the last flushed one is `SYNC_EVERY` seconds old, and
always the run's last; that flushed one is kept until a newer one is flushed. A machine crash then
costs at most that much training more than a kill does. (Flushing every checkpoint of the default
run, 12 a second, cost about 2-3 % of its training time on 2 cores.)

The data order and the augmentation need no saved state: they are functions of the seed, the
epoch and the sample (`tasks.core.data`).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
SYNC_EVERY = 1.0  # seconds: how old the last checkpoint flushed to disk may be before the next is flushed
NAME = re.compile(r"step-(\d+)-epoch-(\d+)-([0-9a-f]{16})\.pt")


def host_state() -> dict[str, Any]:
    """Python's and numpy's global generators, as tensors and plain values."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss_next],  # a tensor: 625 ints pickle slowly
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
    }


def seed_host(seed: int, epoch: int, rank: int = 0) -> dict[str, Any]:
    """Seed Python's and numpy's global generators for this epoch of this process; return their state.

    The pipeline draws nothing from them (its order and augmentation have their own generators),
    but a user's transform may. They are seeded afresh each epoch, from (seed, epoch, rank), and a
    checkpoint holds the state each epoch started from, not the state at the time it was written:
    other libraries draw from Python's generator in threads of their own (the websockets client
    under Prefect's event stream, for its keep-alive pings, every 20 s), so that state would make
    checkpoints, and the dvc.lock that records them, differ from run to run.
    """
    text = f"{seed}:{epoch}:{rank}"
    random.seed(text)
    np.random.seed(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little"))
    return host_state()


def rng_state(host: dict[str, Any]) -> dict[str, Any]:
    """Every random generator this process draws from, as tensors and plain values: torch's now,
    Python's and numpy's as `host` (what `seed_host` returned this epoch) gives them."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        **host,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss_next))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _entries(folder: Path) -> list[tuple[int, int, str, Path]]:
    """(steps, epoch, sha256 prefix, path) of every checkpoint file, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = NAME.fullmatch(name)
        if match:
            found.append((int(match[1]), int(match[2]), match[3], folder / name))
    return sorted(found)


def write(folder: Path, state: dict[str, Any], steps: int, epoch: int) -> tuple[Path, Path]:
    """A checkpoint's first half, all CPU: `state` serialized into a temporary file; (that file, its final name)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # the sha256 in the name covers every byte, CRC-32s included
    try:
        torch.save(state, buffer)
    finally:
        torch.serialization.set_crc32_options(crc32)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = folder / f"step-{steps:09d}-epoch-{epoch:04d}-{digest}.pt"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, path


def place(tmp: Path, path: Path, keep: int, sync: bool, spare: Path | None) -> Path:
    """Its second half, mostly waiting for the disk: flushed if `sync`, renamed into place; of the older ones, the
    newest `keep` stay, and `spare` (the newest flushed one, while newer ones are not)."""
    try:
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = path.parent
    if sync:
        _fsync_dir(folder)
    for *_, old in _entries(folder)[:-keep]:
        if old != spare:
            old.unlink(missing_ok=True)
    return path


class Writer:
    """Writes the checkpoints of one training, without making it wait for the disk.

    Serializing is CPU work; flushing to disk is waiting. On a CPU, torch's threads already use
    every core, and serializing in a thread beside them cost more than in the training thread
    (the default run on 2 cores: about 2 % of its training time more; most likely torch's threads
    waited for each other while the writer held a core). So there the training thread serializes
    and writes the file into the operating system's cache, and a thread waits for the flush to
    disk, when there is one (about 1 ms for the default run's 370 KB here, more for larger states
    and slower disks), while training goes on. With `background=True` (GPU training, where the CPU
    is free) the thread does all of it: `save` copies the state first (training changes the
    tensors in place).

    `save` waits for the previous write and starts this one; `wait` returns when it is written and
    raises what it raised. The thread is not a daemon: after Ctrl-C the write in progress completes.
    """

    def __init__(self, background: bool = False, sync_every: float = SYNC_EVERY) -> None:
        self.background, self.sync_every = background, sync_every
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._synced: Path | None = None  # the newest checkpoint flushed to disk
        self._synced_at = -float("inf")

    def save(self, folder: Path, state: dict[str, Any], steps: int, epoch: int, keep: int, last: bool = False) -> None:
        """Write the newest checkpoint; `last`: the run's last, always flushed to disk."""
        self.wait()
        sync = last or time.monotonic() - self._synced_at >= self.sync_every
        spare = None if sync else self._synced

        def finish(tmp: Path, path: Path) -> None:
            place(tmp, path, keep, sync, spare)
            if sync:
                self._synced, self._synced_at = path, time.monotonic()

        if self.background:
            snapshot = _copied(state)
            self._start(lambda: finish(*write(folder, snapshot, steps, epoch)))
            return
        tmp, path = write(folder, state, steps, epoch)
        if sync:
            self._start(lambda: finish(tmp, path))
        else:
            finish(tmp, path)

    def _start(self, job: Callable[[], None]) -> None:
        def run() -> None:
            try:
                job()
            except BaseException as exc:  # re-raised in the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _copied(obj: Any) -> Any:
    """Tensors copied to the CPU, containers copied; plain values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copied(v) for v in obj)
    return obj


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_latest(folder: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that is whole and readable, or None; each bad newer one is named to `warn`."""
    for _, _, digest, path in reversed(_entries(folder)):
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest()[:16] != digest:
                raise ValueError("its content does not match the sha256 in its name: cut short or changed on disk")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError("it was not written by this version of train")
        except Exception as exc:  # any unreadable file: fall back to the one before
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            warn(f"checkpoint {path} is unusable ({reason}); trying the one before it")
            continue
        return state, path
    return None


def clear(folder: Path) -> None:
    """Remove every checkpoint (and temporary file) in `folder`."""
    for *_, path in _entries(folder):
        path.unlink(missing_ok=True)
    for tmp in folder.glob(".step-*.tmp") if folder.is_dir() else []:
        tmp.unlink(missing_ok=True)
