"""One MLflow run per pipeline run, addressed by its id, never by MLflow's thread-local active run.

`train` opens the run (params, lineage tags, the manifest and params file) and logs one point
per epoch; `evaluate` and `export` add the test metrics, the plots and the models to the same
run. They find it from the model they work on: `train` tags the run with the sha256 of
`models/train/best.pt` and notes the run id in `models/train/run.json`, a local pointer that is
not a DVC output (a run id differs on every run by nature, and must not make `dvc.lock` differ).
So a `dvc repro` (one process per stage) and a Prefect flow (one process) make the same single run.

Failures of the store become one-line `TrackingError`s. A run left RUNNING by a killed process
is closed as KILLED by the next `train` in the same checkout (its tags name the host, the
checkout and the process id). The store is `MLFLOW_TRACKING_URI`, by default `sqlite:///mlflow.db`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import PipelineError, TrackingError
from tasks.files import process_alive, process_id, sha256_file
from tasks.paths import RUN_NOTE

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_FILE = RUN_NOTE
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "pipeline"
PIPELINE_WRITES = ("dvc.lock", "metrics", "plots", "data/prepared/report.json")  # in git, rewritten by runs
MODEL_TAG = "train.best_sha256"
RETRAIN = "dvc repro --force --downstream train"

# Refuse pickle when loading models through MLflow: a model file planted in the artifact store must
# not run code on whoever loads it (MLflow's default is to allow it).
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
# Asynchronous metrics (train's per-epoch points) go out in batches once a second. Without this, the
# logging thread polls its queue with a 1 s timeout, and ending the run waits for that poll.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
# A progress bar per artifact download, in a log, says nothing.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's SQL store logs each failure with a traceback before raising it; `store()` reports the
# raised error in one line, so the log adds only noise (as do its "Creating tables" notes).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


UI_MODE = "workflowType=machine_learning"  # the UI's "Model training" side bar, not its GenAI one (the default)


def ui_url() -> str:
    """Where a person opens the MLflow UI: MLFLOW_UI_URL, the tracking server, or `scripts/mlflow-ui.sh`'s address."""
    uri = tracking_uri()
    default = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return (os.environ.get("MLFLOW_UI_URL") or default).rstrip("/")


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI; a TrackingError at once when the store is gone or does not answer."""
    check_store(must_exist=True)
    with store():
        experiment_id = client().get_run(run_id).info.experiment_id
    return f"{ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _reason(exc: BaseException) -> str:
    """The innermost message of a store failure, on one line."""
    while True:
        inner = getattr(exc, "orig", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:200]


SCHEMA = re.compile(r"out-of-date database schema \(found version (\w+), but expected (\w+)\)")


def _schema_mismatch(found: str, expected: str) -> tuple[str, str]:
    """(reason, hint) for a store whose schema is not this MLflow's: upgrade an older one, or use a newer MLflow.

    MLflow calls both "out-of-date" and tells to upgrade, which cannot work on a store written by a
    newer MLflow (a store shared with another environment): its revision is none of this MLflow's.
    """
    import mlflow

    versions = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    if any(versions.glob(f"{found}_*.py")):
        return (
            f"its database schema ({found}) is from an older MLflow than this one ({mlflow.__version__}, schema "
            f"{expected})",
            f"back it up, then upgrade it: mlflow db upgrade {tracking_uri()}",
        )
    return (
        f"its database schema ({found}) is newer than this MLflow ({mlflow.__version__}) knows: a newer MLflow "
        "wrote it, and this one cannot read it",
        "use that MLflow version",
    )


@contextmanager
def store() -> Iterator[None]:
    """Turn failures of the tracking store into one TrackingError naming the store."""
    try:
        yield
    except PipelineError:  # already one line for the user (a TrackingError, or the caller's own)
        raise
    except Exception as exc:
        reason = _reason(exc)
        if schema := SCHEMA.search(reason):
            reason, hint = _schema_mismatch(*schema.groups())
        elif "readonly" in reason:
            hint = "make the file and its folder writable"
        elif "error code 401" in reason:
            hint = "the server wants a user: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        else:
            hint = "check the store"
        raise TrackingError(
            f"MLflow store {tracking_uri()}: {reason}; {hint}, or point MLFLOW_TRACKING_URI at another store"
        ) from None


def check_store(must_exist: bool) -> None:
    """Fail fast, with one line, when the store is gone or its server does not answer.

    An unreachable tracking server would otherwise be retried for minutes; a deleted SQLite file
    would be silently recreated empty.
    """
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and must_exist and not db.exists():
        raise TrackingError(
            f"MLflow store {uri} does not exist ({db} was deleted or moved?), so the run of the current model "
            f"is not there; train again to log a new run: {RETRAIN}"
        )
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({getattr(exc, 'reason', exc)}); start it, "
                f"or unset MLFLOW_TRACKING_URI to log to {DEFAULT_URI}"
            ) from None


def get_run(run_id: str) -> Any:
    """A run of the store, by id; one InputError line when the store has no such run."""
    from mlflow.exceptions import MlflowException

    from tasks.errors import InputError

    check_store(must_exist=True)
    with store():
        try:
            return client().get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    raise InputError(f"no MLflow run {run_id} in {tracking_uri()}; the run page's URL shows its id")


def client() -> MlflowClient:
    with store():
        return _client(tracking_uri())


@functools.cache
def _client(uri: str) -> MlflowClient:
    # One per store: train logs every epoch, and a new client per call cost about 2 ms more each time.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git(*args: str) -> str | None:
    """The output of a git command in the current folder, or None when git or the repository is missing."""
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_tags(params_path: Path, params_changed: bool) -> dict[str, str]:
    """The commit, and whether the checkout differs from it, for lineage.

    The params file counts by its values (`params_changed`, from `tasks.naming.changes`), not its
    text: `--set` and `dvc exp run -S` rewrite it in their own layout. What a pipeline run itself
    rewrites (dvc.lock, metrics, plots) does not count.
    """
    commit = git("rev-parse", "HEAD")
    skip = [*PIPELINE_WRITES, str(params_path)]
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in skip))
    changed = sorted(line.split(maxsplit=1)[-1] for line in (status or "").splitlines())  # "XY path"
    return {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status) or params_changed).lower(),
        # the files (not params.yaml, whose values the run logs) that differ from the commit: what a
        # reproduction from the commit cannot restore
        "git.uncommitted": "unknown" if status is None else _clip(", ".join(changed)),
    }


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def process_tags() -> dict[str, str]:
    """Which process on which machine holds the run open: what finds runs left RUNNING by a kill."""
    return {
        "pipeline.host": socket.gethostname(),
        "pipeline.checkout": str(Path.cwd().resolve()),
        "pipeline.pid": process_id(),  # pid and start time: a later process with the same pid is not it
    }


# The runs list as a saved MLflow view: without it, the list shows no param and no metric until a
# person picks columns. Opened by `runs_list_url` (the UI's "share view" link, `?viewStateShareKey=`);
# "Override saved view" in the UI makes it that person's default.
VIEW_KEY = "pipeline-columns"
RUNS_VIEW = {
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "selectedColumns": [
        "attributes.`Created`",
        "attributes.`Duration`",
        "attributes.`Source`",
        "attributes.`Version`",
        *(f"metrics.`{k}`" for k in ("test/accuracy", "test/f1_macro", "best/val_accuracy")),
        *(f"params.`{k}`" for k in ("build.model", "train.epochs", "train.lr", "train.optimizer")),
    ],
}
EXPERIMENT_TAGS = {
    # Opens the experiment in the UI's model-training view (MLflow 3 otherwise guesses, often GenAI).
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(RUNS_VIEW),
}


def _experiment_id() -> str:
    c = client()
    name = experiment_name()
    with store():
        experiment = c.get_experiment_by_name(name)
        if experiment is None:
            return c.create_experiment(name, tags=EXPERIMENT_TAGS)
        for key, value in EXPERIMENT_TAGS.items():  # made by an older version, or by hand
            if experiment.tags.get(key) != value:
                c.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id


def runs_list_link() -> str:
    """The project experiment's runs list with its saved columns, or the UI's address when there is none yet."""
    try:
        check_store(must_exist=True)  # a server that does not answer: no minutes of retries for a link
        with store():
            experiment = client().get_experiment_by_name(experiment_name())
    except TrackingError:
        experiment = None
    return runs_list_url(experiment.experiment_id) if experiment else ui_url()


def ui_link() -> str:
    """What `scripts/mlflow-ui.sh` prints before it starts the UI: `runs_list_link()`, after opening the store.

    A store that exists but cannot be opened (another MLflow's schema, an unreadable file) raises
    its one-line TrackingError here, instead of the UI failing with MLflow's traceback after the link.
    """
    db = _sqlite_path(tracking_uri())
    if db is not None and db.exists():
        with store():
            client().search_experiments(max_results=1)
    return runs_list_link()


def runs_list_url(experiment_id: str, base: str | None = None) -> str:
    """The experiment's runs list in the MLflow UI, with the main params and metrics as columns."""
    return f"{base or ui_url()}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{UI_MODE}"


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this checkout left RUNNING by a process that no longer exists."""
    c = client()
    me = process_tags()
    checkout = me["pipeline.checkout"].replace("'", "\\'")
    with store():
        running = c.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`pipeline.checkout` = '{checkout}'"
        )
    closed = []
    for run in running:
        tags = run.data.tags
        pid = tags.get("pipeline.pid", "")
        if tags.get("pipeline.host") != me["pipeline.host"] or (pid and process_alive(pid)):
            continue
        with store():
            c.set_tag(run.info.run_id, "pipeline.closed", "left RUNNING by a killed process; closed by the next run")
            c.set_terminated(run.info.run_id, "KILLED")
        pid = pid.split("-")[0]
        print(f"closed MLflow run {run.info.run_id} as KILLED: its process ({pid}) was killed without ending it")
        closed.append(run.info.run_id)
    return closed


def start_run(flat_params: dict[str, Any], tags: dict[str, str], name: str | None = None) -> str:
    """Create the run with its params, tags and name; return its id."""
    from mlflow.entities import Param

    check_store(must_exist=False)
    c = client()
    experiment_id = _experiment_id()
    close_abandoned_runs(experiment_id)
    with store():
        run = c.create_run(experiment_id, tags={**process_tags(), **tags}, run_name=name)
        run_id = run.info.run_id
        c.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat_params.items()])
    return run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log at `step`, now."""
    log_steps(run_id, [(step, int(time.time() * 1000), metrics)])


MAX_BATCH = 1000  # metrics in one call: what MLflow's REST API takes


def log_steps(run_id: str, rows: list[tuple[int, int, dict[str, float]]], synchronous: bool = True) -> list[Any]:
    """Log (step, time in ms, metrics) rows in as few calls as the store takes.

    With `synchronous=False` return at once, and `wait` on what this returns later.
    """
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), ms, step) for step, ms, metrics in rows for k, v in metrics.items()]
    with store():
        return [
            client().log_batch(run_id, metrics=batch[start : start + MAX_BATCH], synchronous=synchronous)
            for start in range(0, len(batch), MAX_BATCH)
        ]


def wait(operations: list[Any]) -> None:
    """Send what asynchronous `log_steps` calls left queued, now; any failure becomes a TrackingError."""
    if not operations:
        return
    with store():
        client()._tracking_client.store.flush_async_logging()  # wakes the logging thread: no buffering wait
        for operation in operations:
            operation.wait()


def logged_steps(run_id: str, key: str) -> set[int]:
    with store():
        return {m.step for m in client().get_metric_history(run_id, key)}


def latest_run_with(tag: str, value: str) -> tuple[str, str, float] | None:
    """(id, status, start time in s) of this checkout's newest run tagged `tag = value` in this experiment, or None."""
    checkout = process_tags()["pipeline.checkout"].replace("'", "\\'")
    with store():
        runs = client().search_runs(
            [_experiment_id()],
            filter_string=f"tags.`{tag}` = '{value}' and tags.`pipeline.checkout` = '{checkout}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    return (runs[0].info.run_id, runs[0].info.status, runs[0].info.start_time / 1000) if runs else None


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Make an interrupted run RUNNING again, held by this process: a resumed training goes on in it."""
    check_store(must_exist=True)
    set_tags(run_id, {**process_tags(), **tags})
    with store():
        client().update_run(run_id, status="RUNNING")
    close_abandoned_runs(_experiment_id())


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    with store():
        client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


DATA_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}


def log_datasets(run_id: str, records: list[dict[str, Any]]) -> None:
    """Each split (`inputs.split_record`) as a dataset input of the run, its digest the DVC hash of its images."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec

    inputs = []
    for r in records:
        schema = TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype("uint8"), (-1, *r["shape"]), "images")]),
            targets=Schema([TensorSpec(np.dtype("int64"), (-1,), "labels")]),
        )
        dataset = Dataset(
            name=r["name"],
            digest=r["digest"],
            source_type="dvc",
            source=json.dumps({"files": r["files"], "hash": "md5, as dvc.lock records it"}),
            schema=json.dumps(schema.to_dict()),
            profile=json.dumps({"num_rows": r["rows"], "classes": r["classes"]}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", DATA_CONTEXT[r["split"]])]))
    with store():
        try:
            client().log_inputs(run_id, datasets=inputs)
        except Exception as exc:
            # Two runs logging a data set new to the experiment at the same moment (a sweep's trials)
            # both insert it, and the store keeps the first; the second attempt finds it there.
            if "UNIQUE constraint failed: datasets." not in str(exc) and '"dataset_pk"' not in str(exc):
                raise
            client().log_inputs(run_id, datasets=inputs)


def log_artifacts(run_id: str, folder: str, paths: list[Path]) -> None:
    c = client()
    with store():
        for path in paths:
            c.log_artifact(run_id, str(path), folder)


def table_json(table: dict[str, list]) -> str:
    """A table (column name -> values) in the JSON form MLflow's UI shows as a table (what `log_table` writes)."""
    columns = list(table)
    return json.dumps({"columns": columns, "data": [list(row) for row in zip(*table.values(), strict=True)]})


def log_table(run_id: str, path: Path) -> None:
    """Log a `table_json` file at the run's root, replacing an earlier one, and mark it as a table for the UI.

    Not `MlflowClient.log_table`: it appends to a table of the same name, so an evaluate run twice
    in one run (a changed `evaluate.*` param) would show every class twice.
    """
    c = client()
    with store():
        c.log_artifact(run_id, str(path))
        logged = json.loads(c.get_run(run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        entry = {"path": path.name, "type": "table"}
        if entry not in logged:
            c.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps([*logged, entry]))


KILLED_RUNS: list[str] = []  # what this process marked KILLED: the interrupt message names them


def end_run(run_id: str, status: str) -> None:
    """FINISHED, FAILED or KILLED (interrupted)."""
    with store():
        client().set_terminated(run_id, status)
    if status == "KILLED":
        KILLED_RUNS.append(run_id)


@contextmanager
def stage_run(run_id: str, stage: str) -> Iterator[None]:
    """The run is RUNNING while `stage` works in it, and ends with the stage: FINISHED, FAILED or KILLED.

    Every step that adds to the run does this, so the run ends when the last step that ran ends,
    with that step's end time: after export in a full run, after evaluate when only evaluate was
    out of date. A failed step's message stays on the run (`pipeline.error`) until a step succeeds.
    """

    with store():
        run = client().get_run(run_id)
        if run.info.status != "RUNNING":
            client().update_run(run_id, status="RUNNING")
    set_tags(run_id, {**process_tags(), "pipeline.stage": stage})
    try:
        yield
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"  # Ctrl-C, SIGTERM: stopped from outside
        if status == "FAILED":
            reason = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(PipelineError):
                set_tags(run_id, {"pipeline.error": f"{stage}: {reason}"[:5000]})
        with contextlib.suppress(PipelineError):
            end_run(run_id, status)
        raise
    if "pipeline.error" in run.data.tags:
        with store():
            client().delete_tag(run_id, "pipeline.error")
    end_run(run_id, "FINISHED")


def carry_over(run_id: str, model_sha256: str) -> str | None:
    """Give this run the test metrics and models of the latest earlier run that trained the very same weights.

    When training reproduces the previous weights byte for byte, DVC rightly finds evaluate and
    export up to date and skips them; without this, the new run would show no test results.
    Returns the earlier run's id, or None when there is none with results.
    """
    from mlflow.entities import LoggedModelOutput, Metric

    c = client()
    with store():
        earlier = c.search_runs(
            [_experiment_id()],
            filter_string=f"tags.`{MODEL_TAG}` = '{model_sha256}' and attributes.status != 'RUNNING'",
            order_by=["attributes.start_time DESC"],
        )
        # Any that has test results: one whose export failed (FAILED) still evaluated these weights.
        done = [r for r in earlier if r.info.run_id != run_id and any(k.startswith("test/") for k in r.data.metrics)]
        if not done:
            return None
        source = done[0]
        now = int(time.time() * 1000)
        # test/accuracy, test/f1_macro, test/loss; not the per-class ones that older runs logged as metrics
        tests = [Metric(k, v, now, 0) for k, v in source.data.metrics.items() if re.fullmatch(r"test/[^/]+", k)]
        c.log_batch(run_id, metrics=tests)
        outputs = source.outputs.model_outputs if source.outputs else []
        # The finished models exported from these very weights: those that run logged, or carried over
        # in turn from an earlier run of the same weights (a third run of them finds the second first).
        models = [c.get_logged_model(m.model_id) for m in outputs]
        others = {m.source_run_id for m in models} - {source.info.run_id}
        same = {source.info.run_id} | {r for r in others if c.get_run(r).data.tags.get(MODEL_TAG) == model_sha256}
        ready = [m for m in models if m.source_run_id in same and str(m.status) == "READY"]
        # A resumed run may hold them already (its export failed after this), and MLflow would add
        # each again, which its store refuses (a UNIQUE constraint on the inputs table).
        run = c.get_run(run_id)
        held = {m.model_id for m in run.outputs.model_outputs} if run.outputs else set()
        ready = [m for m in ready if m.model_id not in held]
        if ready:
            c.log_outputs(run_id, [LoggedModelOutput(m.model_id, step=0) for m in ready])
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:  # older runs have no table
        log_table(run_id, Path(c.download_artifacts(source.info.run_id, "per_class.json", tmp)))
    # export's tags too: the files' hashes, and that the export check passed (what promote requires)
    exported = {k: v for k, v in source.data.tags.items() if k.startswith("export.")}
    set_tags(run_id, {**exported, "pipeline.same_model_as": source.info.run_id})
    return source.info.run_id


def note_run(run_id: str, model_sha256: str) -> None:
    """Note locally which run trained the model with this hash (the run carries the same hash as a tag).

    Best effort: the note only saves a search, so failing to write it must not fail a finished step.
    """
    from tasks.errors import OutputError
    from tasks.files import json_text, write_text

    try:
        write_text(RUN_FILE, json_text({"run_id": run_id, "tracking_uri": tracking_uri(), "best_sha256": model_sha256}))
    except OutputError as exc:
        print(f"warning: {exc} (only a shortcut: evaluate and export find the run by the model's hash)")


def noted_run() -> dict[str, str]:
    """The local note `note_run` wrote (run id, store, model hash), or {} when it is missing or unreadable."""
    try:
        noted = json.loads(RUN_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return noted if isinstance(noted, dict) else {}


def current_run_id(model: Path) -> str:
    """The run that trained `model`: from the local note when it matches, else by the model's hash tag."""
    digest = sha256_file(model)
    noted = noted_run()
    elsewhere = noted.get("tracking_uri")
    if elsewhere == tracking_uri():
        elsewhere = None
    try:
        check_store(must_exist=True)
        c = client()
        if noted.get("best_sha256") == digest and not elsewhere:
            from mlflow.exceptions import MlflowException

            with store():
                try:
                    return c.get_run(str(noted.get("run_id"))).info.run_id
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
        with store():
            experiments = [e.experiment_id for e in c.search_experiments()]
            found = c.search_runs(
                experiments,
                filter_string=f"tags.`{MODEL_TAG}` = '{digest}'",
                order_by=["attributes.start_time DESC"],
            )
        if found:
            # This checkout's run first, then a finished one (a killed train may have tagged its run).
            here = process_tags()["pipeline.checkout"]
            found.sort(key=lambda r: (r.data.tags.get("pipeline.checkout") != here, r.info.status != "FINISHED"))
            return found[0].info.run_id
        raise TrackingError(
            f"no MLflow run in {tracking_uri()} trained {model} (sha256 {digest[:12]}; the run was deleted, or the "
            f"store is another one); train again to log a new run: {RETRAIN}"
        )
    except TrackingError:
        if not elsewhere:
            raise
        # The likelier story: the model was logged to another store than the one set now.
        raise TrackingError(
            f"the model in {model.parent} was logged to {elsewhere}, but MLFLOW_TRACKING_URI is {tracking_uri()}: "
            f"use the same store, or train again: {RETRAIN}"
        ) from None
