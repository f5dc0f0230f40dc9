"""One trial of a sweep, in its own process and its own folder: `python -m flows.trial STAGE...`.

`flows/sweep.py` starts it with the trial's folder as the working directory. The folder holds the
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

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tasks import STAGES, StepContext, run_stage
from tasks.cli import stop_on_sigterm, user_errors
from tasks.errors import ConfigError, DataError, ExportError, PipelineError, TrainingError
from tasks.files import json_text, write_text
from tasks.params import PARAMS_FILE, load

RESULT = Path("result.json")
TRIAL = Path("trial.json")
# Failures that the same params, data and code meet again: recorded, so a restarted sweep skips the trial.
LASTING = (ConfigError, DataError, TrainingError, ExportError)


def watch_parent(every: float = 0.5) -> None:
    """Stop (as on SIGTERM) when the process that started this one is gone: a sweep killed, a Dask worker closed."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


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


def main(argv: list[str]) -> None:
    stages = argv or ["build", "train", "evaluate"]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        sys.exit(f"error: unknown steps {unknown}; choose from {', '.join(STAGES)}")
    stop_on_sigterm()
    watch_parent()
    with user_errors():
        run(stages)


if __name__ == "__main__":
    main(sys.argv[1:])
