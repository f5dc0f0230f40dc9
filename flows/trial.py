"""One trial of a sweep, in its own process and its own folder: `python -m flows.trial STAGE...`.

`flows/sweep_flow.py` starts it with the trial's folder as the working directory: forked from Python's
forkserver, which has imported torch, MLflow and torchmetrics once for the whole sweep (`start`), or
as that command on a Dask worker. The folder holds the
trial's `params.yaml` and `trial.json` (the tags of its MLflow run: its parent run, its name), and
links to the prepared data it shares with the other trials; the steps write their outputs there,
with the same relative paths as in the checkout, so trials never share an output, a params file or
an MLflow run. The steps are the pipeline's own (`tasks.run_stage`); DVC is not involved: a sweep
compares configurations, and the one adopted is run by the pipeline, under DVC.

When the steps end, `result.json` says how: `finished` with the run's metrics, or `failed` with
the error, for failures the same params would meet again (a diverging training, bad params). A
trial stopped from outside (Ctrl-C, SIGTERM, its parent process gone) writes nothing, and runs
again when the sweep is started again; its training resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tasks import STAGES, StepContext, run_stage
from tasks.cli import Terminated, fast_exit, user_errors
from tasks.errors import BusyError, ConfigError, DataError, ExportError, PipelineError, TrainingError
from tasks.files import json_text, write_text
from tasks.params import PARAMS_FILE, load

RESULT = Path("result.json")
TRIAL = Path("trial.json")
# Failures that the same params, data and code meet again: recorded, so a restarted sweep skips the trial.
LASTING = (ConfigError, DataError, TrainingError, ExportError)


ROOT = Path(__file__).resolve().parent.parent
CHILDREN: set[Any] = set()  # the trial processes this process started (Popen or Forked): stopped with the sweep
STOPPING = threading.Event()  # set, under CHILDREN_LOCK, when the sweep stops: no trial process starts after it
CHILDREN_LOCK = threading.Lock()
# What a trial imports (about 5 s on 2 cores: torch, torch._dynamo, torchmetrics with torchvision, scipy and
# matplotlib, MLflow and its SQL store), imported once by the process that trial processes are forked from.
PRELOAD = [
    "tasks.build",
    "tasks.train",
    "tasks.evaluate",
    "torch._dynamo",
    "torchmetrics",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "flows.trial",  # this module: see `fast_exit()` below
]
# Wherever this module is imported, the process exits without a last walk of every object (`fast_exit`):
# the forkserver, which imports it, then ends in 0.2 s instead of 1-2 s once the sweep is gone.
fast_exit()


def environment(threads: int, store: str) -> dict[str, str]:
    """What a trial process has in its environment besides the sweep's."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MLFLOW_TRACKING_URI": store}


@functools.cache
def forkserver() -> Any:
    """Python's forkserver, its imports started now, in a process of their own (see `start`)."""
    import multiprocessing
    import multiprocessing.forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()  # returns at once: the server imports while the sweep goes on
    return context


def warm(stages: list[str]) -> bool:
    """Whether these stages, started from this process, are forked warm. Not prepare, which needs none of those
    imports and need not wait for them; not on Dask's worker processes (daemons, which multiprocessing forbids
    to have children)."""
    import multiprocessing

    return stages != ["prepare"] and not multiprocessing.current_process().daemon


def start(folder: Path, stages: list[str], threads: int, store: str) -> int:
    """Run `stages` in `folder`, in a process of their own, output appended to the folder's trial.log; its exit code.

    Called by the sweep's tasks, in the sweep's process or on a Dask worker (which gets this module by
    name: its lock and set are not sent along). In the sweep's process a trial's process is forked
    from Python's forkserver, which imported what trials import once for the whole sweep: the trial
    starts in milliseconds instead of about 5 s of imports, and is still a process of its own (its
    folder, its environment, its own MLflow run; a SIGTERM stops it). Elsewhere, and for prepare, it
    is `python -m flows.trial STAGES`.
    """
    with CHILDREN_LOCK:
        if STOPPING.is_set():
            raise BusyError("the sweep is stopping: no trial starts now")
        if warm(stages):
            proc: Any = Forked(
                forkserver().Process(target=forked, args=(str(folder), stages, threads, store), name=folder.name)
            )
        else:
            env = {**os.environ, **environment(threads, store)}
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
            with open(folder / "trial.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "flows.trial", *stages], cwd=folder, env=env, stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
        CHILDREN.add(proc)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # this thread was stopped: the trial goes too, marking its MLflow run KILLED
            proc.terminate()
            proc.wait()
        CHILDREN.discard(proc)


class Forked:
    """A started `multiprocessing.Process`, waited for and stopped as a `subprocess.Popen` is."""

    def __init__(self, process: Any) -> None:
        self.process = process
        process.start()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()


def forked(folder: str, stages: list[str], threads: int, store: str) -> None:
    """A trial's process forked from the forkserver: what `python -m flows.trial STAGES` does in `folder`."""
    with open(Path(folder) / "trial.log", "ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
    os.chdir(folder)
    os.environ.update(environment(threads, store))
    import torch

    torch.set_num_threads(threads)  # OMP_NUM_THREADS is read when torch loads, in the forkserver
    main(stages)


def stop_all(folder: Path) -> None:
    """Stop every trial: this process's own now, and through the sweep folder's `stop` file those on Dask workers."""
    with CHILDREN_LOCK:
        STOPPING.set()
        for proc in CHILDREN:
            proc.terminate()  # each marks its MLflow run KILLED
    with contextlib.suppress(OSError):
        (folder / "stop").touch()


STOP = Path("../stop")  # the sweep's folder: written when the sweep stops, read by every trial wherever it runs


def watch(every: float = 0.5) -> None:
    """Stop (as on SIGTERM) when the sweep stops, or the process that started this one is gone.

    The sweep, stopped, writes its folder's `stop` file: a trial running on another machine's Dask
    worker, which Dask cannot interrupt, sees it there. A killed sweep or a closed local Dask
    worker leaves this process an orphan.
    """
    import multiprocessing

    parent = os.getppid()
    # Forked from the forkserver, the sweep is not the parent process, and the server outlives it while
    # trials run: multiprocessing's sentinel says when the process that started this one is gone.
    starter = multiprocessing.parent_process()

    def loop() -> None:
        while os.getppid() == parent and not STOP.exists() and (starter is None or starter.is_alive()):
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch", daemon=True).start()


def hold(path: Path, busy: str) -> Any:
    """`path` locked for this process until it ends (or the handle is closed); a BusyError saying `busy` if taken.

    The sweep holds its folder's lock (one start at a time), and each trial process its folder's
    (a trial still running elsewhere is not run again beside it).
    """
    import fcntl

    handle = open(path, "a+")  # noqa: SIM115 - held as long as the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BusyError(busy) from None
    return handle


def metrics() -> dict[str, float]:
    """The trial's results: the best epoch's validation metrics, and the test metrics when evaluate ran."""
    from tasks import paths

    out: dict[str, float] = {}
    train = json.loads(paths.TRAIN_METRICS.read_text())
    out.update({f"val/{k}": float(v) for k, v in train["val"].items()})
    out["best_epoch"] = float(train["best_epoch"])
    if paths.TEST_METRICS.exists():
        out.update({f"test/{k}": float(v) for k, v in json.loads(paths.TEST_METRICS.read_text())["test"].items()})
    return out


def forget_attempts(key: str, keep: str) -> None:
    """Delete (softly: the UI's "Deleted" filter still has them) this trial's runs other than `keep`, the one
    that finished: attempts stopped before their first checkpoint, or before a rerun, hold nothing `keep`
    lacks, and the sweep's parent run shows one run per trial.
    """
    from tasks import tracking

    checkout = tracking.process_tags()["pipeline.checkout"].replace("'", "\\'")
    with tracking.store():
        client = tracking.client()
        runs = client.search_runs(
            [tracking._experiment_id()],
            filter_string=f"tags.`sweep.trial_key` = '{key}' and tags.`pipeline.checkout` = '{checkout}'",
        )
        for old in runs:
            if old.info.run_id != keep:
                client.delete_run(old.info.run_id)


def run(stages: list[str]) -> dict:
    trial = json.loads(TRIAL.read_text()) if TRIAL.exists() else {}
    ctx = StepContext(PARAMS_FILE, trial.get("tags", {}))
    started = time.time()
    stage = ""
    try:
        for stage in stages:
            run_stage(stage, load(PARAMS_FILE), ctx)
    except PipelineError as exc:
        exc.args = (f"{stage}: {exc}",)
        if isinstance(exc, LASTING):
            write_text(RESULT, json_text({"status": "failed", "error": str(exc), "key": trial.get("key")}))
        raise
    result = {"status": "finished", "key": trial.get("key"), "seconds": round(time.time() - started, 1)}
    if "train" in stages:
        from tasks import tracking

        result["run_id"] = tracking.noted_run().get("run_id")
        result["metrics"] = metrics()
        if trial.get("key") and result["run_id"]:
            forget_attempts(trial["key"], keep=result["run_id"])
    write_text(RESULT, json_text(result))
    return result


def stop_once(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM, the first of them only: a terminal's Ctrl-C reaches the sweep and its trials
    together, the sweep then sends each trial a SIGTERM, and its own watch may send one too. A second
    signal would cut short the first one's clean stop (the MLflow run marked KILLED: FAILED instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main(argv: list[str]) -> None:
    stages = argv or ["build", "train", "evaluate"]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        sys.exit(f"error: unknown steps {unknown}; choose from {', '.join(STAGES)}")
    signal.signal(signal.SIGTERM, stop_once)
    signal.signal(signal.SIGINT, stop_once)
    fast_exit()
    with user_errors():
        busy = (
            f"{Path.cwd()} is in use by another run of this trial (a sweep stopped while a Dask worker still ran "
            "it?); wait for it to end, then run the sweep again"
        )
        lock = hold(Path("trial.lock"), busy)  # noqa: F841 - held until this process ends
        watch()
        run(stages)


if __name__ == "__main__":
    main(sys.argv[1:])
