"""One MLflow run per pipeline run, addressed by its id, never by MLflow's thread-local active run.

`train` opens the run (params, lineage tags, the manifest and params file) and logs one point
per epoch; `evaluate` and `export` add the test metrics, the plots and the model to the same
run, whose id they read from `models/train/run.json`. So a `dvc repro` (one process per stage)
and a Prefect flow (one process, tasks on worker threads) make the same single run.

The store is `MLFLOW_TRACKING_URI`, by default `sqlite:///mlflow.db` in the project root.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.files import read_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_FILE = Path("models/train/run.json")
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "pipeline"
PIPELINE_WRITES = ("dvc.lock", "metrics", "plots")

# Offline by default; a user who wants telemetry sets these variables themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def client() -> MlflowClient:
    return _client(tracking_uri())


@functools.cache
def _client(uri: str) -> MlflowClient:
    # One per store: train logs every epoch, and a new client per call cost about 2 ms more each time.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_tags() -> dict[str, str]:
    """The commit and whether the working tree differed from it, for lineage."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # What a pipeline run itself rewrites (dvc.lock, metrics, plots) does not count as dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in PIPELINE_WRITES))
    return {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def start_run(flat_params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create the run with its params and tags; return its id."""
    from mlflow.entities import Param

    c = client()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = c.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else c.create_experiment(name)
    run = c.create_run(experiment_id, tags={**git_tags(), **tags})
    run_id = run.info.run_id
    c.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat_params.items()])
    return run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifacts(run_id: str, folder: str, paths: list[Path]) -> None:
    c = client()
    for path in paths:
        c.log_artifact(run_id, str(path), folder)


def end_run(run_id: str, ok: bool) -> None:
    client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


class TrackingError(Exception):
    """The MLflow run to log to cannot be used; the message says why."""


def current_run_id() -> str:
    """The run that `train` opened for the model the later stages work on."""
    run = read_json(RUN_FILE, made_by="train")
    if run["tracking_uri"] != tracking_uri():
        raise TrackingError(
            f"the model in {RUN_FILE.parent} was logged to {run['tracking_uri']}, but MLFLOW_TRACKING_URI is "
            f"{tracking_uri()}: use the same store, or run 'train' again (dvc repro --force train)"
        )
    return run["run_id"]
