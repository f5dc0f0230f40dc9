"""What the two command lines (`python -m tasks`, `python -m flows.pipeline`) share.

Params arguments, the one-line errors and exit codes of `tasks.errors`, Ctrl-C and SIGTERM as a
clean stop (exit 130 or 143, the MLflow run marked KILLED), and DVC's lock on the checkout, so
that a flow, a `dvc repro` and a stage run by hand never work on the same files at once.

Light on purpose: nothing here imports torch, Prefect or MLflow (DVC only when the lock is taken), nor
pydantic before the params are loaded, so `--help` answers in a tenth of a second.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tasks.errors import BusyError, ConfigError, OutputError, PipelineError
from tasks.paths import PARAMS_FILE

if TYPE_CHECKING:
    from tasks.params import Params


def add_params_arguments(parser: argparse.ArgumentParser, set_help: str) -> None:
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_or_exit(path: Path, overrides: list[str]) -> Params:
    """Validated params, or exit 2 with the one-line message."""
    from tasks.params import load  # pydantic: not for --help

    try:
        return load(path, overrides)
    except ConfigError as exc:
        fail(str(exc), code=ConfigError.exit_code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop cleanly, mark the MLflow run KILLED."""

    signum = signal.SIGTERM


def stop_on_sigterm() -> None:
    """SIGTERM raises `Terminated`; and the process exits without a last garbage collection (`fast_exit`)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    fast_exit()


def fast_exit() -> None:
    """Skip the garbage collections of the interpreter's shutdown; the OS frees the memory at once.

    A process that imported torch, Prefect, MLflow and DVC holds millions of objects, and Python's
    shutdown walks them all: 1-2 s after the program's last line (measured: a flow run spent 2.3 s
    there). `gc.freeze()`, as an exit handler, moves them out of the collector's sight. Every exit
    handler still runs (Prefect's and MLflow's flush what they hold); nothing here relies on a
    collection at exit, as files are written whole and renamed (tasks/files.py).
    """
    atexit.register(gc.freeze)


@contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
    """Expected failures end the program with their one-line message and exit code, not a traceback."""
    try:
        yield
    except PipelineError as exc:
        fail(f"{prefix}{exc}", exc.exit_code)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        tracking = sys.modules.get("tasks.tracking")  # imported only if a step got as far as MLflow
        killed = getattr(tracking, "KILLED_RUNS", [])
        marked = f"; MLflow run {', '.join(killed)} marked KILLED" if killed else ""
        fail(f"{prefix}{name}: the running step left its previous outputs as they were{marked}", 128 + signum)
    except OSError as exc:
        if not exc.filename:
            raise
        fail(f"{prefix}cannot read or write {exc.filename}: {exc.strerror}", OutputError.exit_code)


@contextmanager
def checkout_lock() -> Iterator[Any]:
    """Hold DVC's own lock on this checkout for the whole block; yield the DVC repo (None outside one).

    `dvc repro` takes the same lock, so whichever comes second is refused with one line instead
    of both training on the same files. Inside a stage that `dvc repro` runs (DVC_STAGE is set)
    DVC already holds it, and nothing here is needed: DVC is not even imported (0.3 s a stage).
    Under torchrun, rank 0 holds it for all the processes.
    """
    if not Path(".dvc").is_dir() or os.environ.get("RANK", "0") != "0" or os.environ.get("DVC_STAGE"):
        # Under torchrun only rank 0 takes the lock: it alone writes; the others would find it taken.
        yield None
        return
    import logging

    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    with ExitStack() as stack:
        repo = Repo(".")
        stack.callback(repo.close)
        try:
            stack.enter_context(lock_repo(repo))
        except LockError:
            raise BusyError(
                "another process is working in this checkout (a `dvc repro`, a pipeline flow or a stage holds "
                "DVC's lock, .dvc/tmp/lock); wait for it to finish, then run again"
            ) from None
        yield repo
