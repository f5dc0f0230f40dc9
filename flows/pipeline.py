"""The whole pipeline as one Prefect flow: prepare, build, train, evaluate, export, promote.

    python -m flows.pipeline                         # run what is out of date
    python -m flows.pipeline --set train.lr=0.01     # override params (written to params.yaml)
    python -m flows.pipeline --force                 # run every step
    python -m flows.pipeline --pull                  # dvc pull from the default remote first

Each step is a Prefect task named like its DVC stage, calling the same function as
`dvc repro`, in this one process. Inside a DVC repository the flow holds DVC's lock on the
checkout for the whole run (a `dvc repro` started meanwhile is refused, and the flow refuses to
start beside one), asks DVC which stages are stale, runs only those, and commits each one it ran
to `dvc.lock` and the DVC cache, so a flow run is versioned exactly like a `dvc repro` and a
`dvc repro` after it has nothing to do; after a successful run it pushes them to the default DVC
remote (.dvc/config). Overrides are validated, then written into params.yaml
(as `dvc exp run -S` does), so the file says what the run uses and DVC judges staleness from the
same values.

The Prefect server is PREFECT_API_URL's, or else the project's local one, started in the
background the first time and reused after (see `flows/server.py`). Errors are one line and an
exit code (see `tasks/errors.py`); Ctrl-C exits 130 with the MLflow run marked KILLED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tasks import STAGES, StepContext, checker, run_stage
from tasks.cli import add_params_arguments, checkout_lock, load_or_exit, stop_on_sigterm, user_errors
from tasks.errors import ConfigError, DataError, PipelineError, TrackingError
from tasks.paths import PARAMS_FILE

RETRIES = 2  # train, evaluate and export after a crash or a store away for a moment (train resumes its checkpoint)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    add_params_arguments(
        p, set_help="override a param and write it to the params file, e.g. --set train.lr=0.01 (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="run every step, even those DVC finds up to date")
    p.add_argument(
        "--pull", action="store_true", help="first `dvc pull` the data and outputs from the default DVC remote, if any"
    )
    return p


if __name__ == "__main__":
    # Answer --help and reject bad params before the imports below, which take seconds, and point
    # Prefect at its server before Prefect reads its settings.
    from flows.server import ensure_server

    ARGS = parser().parse_args()
    load_or_exit(ARGS.params, ARGS.overrides)
    with user_errors():
        if ARGS.overrides:
            from tasks.params import check_writable

            check_writable(ARGS.params)
        ensure_server()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Completed  # noqa: E402
from prefect.utilities.urls import url_for  # noqa: E402

from flows import logs  # noqa: E402
from tasks.params import Params, load, write_overrides  # noqa: E402


class StepFormatter(logs.PrefixFormatter):
    """`17:01:43 [3/5 train] epoch 1/30 ...`: the time, how far the run is, and the message.

    Instead of Prefect's 45-character prefix (time, level and the task run's name) on every line.
    The level is shown only when it is not INFO; a step's own `train: ` prefix is not repeated.
    """

    def where(self, record: logging.LogRecord) -> tuple[str, str]:
        stage = getattr(record, "stage", None) or getattr(record, "task_run_name", None)
        message = record.getMessage()
        if stage in STAGES:
            return f"{STAGES.index(stage) + 1}/{len(STAGES)} {stage}", message.removeprefix(f"{stage}: ")
        return "pipeline", message


logs.install(StepFormatter())


def step(stage: str, params_path: str, tags: dict[str, str], up_to_date: bool = False) -> Any:
    """One pipeline step; takes and returns paths and small summaries, never tensors.

    A step DVC finds up to date is still a task run, in state Skipped, so the flow run's graph
    always shows every step.
    """
    if up_to_date:
        return Completed(name="Skipped", message="up to date: DVC found its code, data and params unchanged")
    path = Path(params_path)
    return run_stage(stage, load(path), StepContext(path, tags))


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a crash (out of memory, a lost device) or a tracking store away for a moment; not a user's mistake.

    A retried train resumes from its last checkpoint, in the same MLflow run.
    """
    try:
        state.result()
    except TrackingError:
        return True
    except PipelineError:
        return False  # a wrong param, bad data, a diverging run: the same again would fail the same way
    except Exception:
        return True
    return False


# One Prefect task per stage, named like the stage. Inputs are paths, so nothing to cache.
STEP_TASKS = {stage: task(step, name=stage, task_run_name=stage, cache_policy=NO_CACHE) for stage in STAGES}
for _stage in ("train", "evaluate", "export", "promote"):  # the steps that talk to the tracking store
    STEP_TASKS[_stage] = STEP_TASKS[_stage].with_options(
        retries=RETRIES, retry_delay_seconds=[10, 60], retry_condition_fn=worth_retrying
    )


def changed_params(params_path: str, overrides: list[str] | None) -> tuple[Params, dict]:
    """The params a run will use, and those that differ from the committed params.yaml."""
    from tasks import naming

    path = Path(params_path)
    params = load(path, overrides)
    return params, naming.changes(params, naming.committed_params(path))


def run_title() -> str:
    """The flow run's name, from its parameters, the same as its MLflow run's: `cnn-digits lr=0.01`."""
    from tasks import naming

    parameters = flow_run.parameters
    try:
        params, changed = changed_params(parameters.get("params_path", str(PARAMS_FILE)), parameters.get("overrides"))
        return naming.run_name(params, changed, naming.experiment_name())
    except ConfigError:
        return "pipeline (params not valid)"  # the flow stops with the message at once
    except Exception:  # a name is not worth a crash before the flow run has even started
        return "pipeline"


def params_artifact(params: Params, changed: dict) -> None:
    """Every param this run used, in the flow run's Artifacts tab; the ones that differ from git's HEAD first."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {
            "param": k,
            "value": json.dumps(v, ensure_ascii=False),
            "committed": json.dumps(changed[k][0], ensure_ascii=False) if k in changed else "",
        }
        for k, v in params.flat().items()
    ]
    rows.sort(key=lambda row: row["committed"] == "")
    create_table_artifact(
        rows,
        key="pipeline-params",
        description=f"The params this run used: {len(changed)} differ from the committed params.yaml "
        "(their committed value is shown beside them).",
    )


def test_metrics() -> dict | None:
    from tasks.paths import TEST_METRICS

    try:
        return json.loads(TEST_METRICS.read_text())["test"]
    except (OSError, ValueError, KeyError):
        return None


def results_artifact(name: str, before: dict | None, results: dict) -> None:
    """The test metrics, their change against the checkout's previous results, and the MLflow run, as an artifact."""
    from prefect.artifacts import create_markdown_artifact

    from tasks import tracking

    after = test_metrics()
    lines = [f"# {name}", ""]
    if after is None:
        lines.append("No test metrics yet.")
    else:
        lines += ["| test metric | this run | before | change |", "|---|---|---|---|"]
        for key in ("accuracy", "f1_macro", "loss"):
            old = (before or {}).get(key)
            change = f"{after[key] - old:+.4f}" if isinstance(old, float) else "(first run)"
            lines.append(f"| {key} | {after[key]:.4f} | {'' if old is None else f'{old:.4f}'} | {change} |")
    run_id = tracking.noted_run().get("run_id")
    if run_id:
        try:
            lines += ["", f"MLflow run: [{run_id}]({tracking.run_url(run_id)})"]
        except PipelineError as exc:
            lines += ["", f"MLflow run {run_id} ({exc})"]
    if isinstance(decision := results.get("promote"), dict) and decision.get("reason"):
        lines += ["", f"Registry ({decision['decision']}): {decision['reason']}"]
    lines += [
        "",
        "Steps: "
        + ", ".join(f"{stage} {'up to date' if r == 'up to date' else 'ran'}" for stage, r in results.items()),
    ]
    create_markdown_artifact(
        "\n".join(lines), key="pipeline-results", description="Test metrics, the change against before, the MLflow run"
    )


def pull_data(repo: Any, logger: Any) -> None:
    """`dvc pull` from the default remote, when one is configured: the data and outputs dvc.lock names.

    Train's checkpoints only into a checkout that has none: those of an interrupted training are
    newer than dvc.lock's, and are what the next run resumes from. What neither the cache nor the
    remote has (not pushed yet, or a remote DVC cannot reach: for an HTTP remote DVC cannot tell
    the two apart) is left out with one warning: those stages are stale and run. Files changed in
    the checkout and saved nowhere are not overwritten: the pull is refused, naming them.
    """
    from dvc.exceptions import CheckoutError, DvcException

    from tasks import paths

    remote = repo.config["core"].get("remote")
    if not remote:
        logger.info("pull: no default DVC remote (`dvc remote add -d NAME URL`): using the checkout's data")
        return
    root = Path(repo.root_dir)
    keep = checkpoint_files(root)  # an interrupted training's, or dvc.lock's: either way nothing to fetch
    targets = [
        str(root / out) for stage in STAGES for out in paths.OUTPUTS[stage] if not (keep and out == paths.CHECKPOINTS)
    ]
    missing: list[str] = []
    try:
        with quiet_dvc():
            result = repo.pull(targets=targets)
    except CheckoutError as exc:
        result = exc.result
        missing = sorted(os.path.relpath(os.path.abspath(path), repo.root_dir) for path in exc.target_infos)
    except (DvcException, ImportError) as exc:  # ImportError: a remote type whose plugin is not installed
        text = str(exc)
        if text.startswith("Can't remove the following unsaved files"):
            changed = [os.path.relpath(line, repo.root_dir) for line in text.splitlines()[1:]]
            raise DataError(
                f"dvc pull would overwrite files changed in this checkout and saved nowhere ({', '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''}); `dvc commit` them or delete them, then run again"
            ) from None
        reason = " ".join(text.split())[:300] or type(exc).__name__
        raise DataError(
            f"dvc pull from remote '{remote}' failed: {reason}; check `dvc remote list` and that the remote is "
            "reachable, or run with pull off"
        ) from None
    stats = result["stats"]
    count = {k: v if isinstance(v, int) else len(v) for k, v in stats.items()}  # counts, or lists of paths
    changed = sum(count.get(kind, 0) for kind in ("added", "modified", "deleted"))
    logger.info(f"pull: remote '{remote}': {count.get('fetched', 0)} files fetched, {changed} changed in the checkout")
    if missing:
        logger.warning(
            f"pull: {len(missing)} outputs are neither in the DVC cache nor on remote '{remote}' (not pushed yet, or "
            f"the remote cannot be reached): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
            "the stages that make them run"
        )


@contextlib.contextmanager
def quiet_dvc() -> Any:
    """DVC's own warnings off for a pull or push: they list every missing hash; the caller says it in one line."""
    quiet = [logging.getLogger(name) for name in ("dvc", "dvc_data")]
    levels = [logger_.level for logger_ in quiet]
    for logger_ in quiet:
        logger_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger_, level in zip(quiet, levels, strict=True):
            logger_.setLevel(level)


def push_outputs(repo: Any, logger: Any) -> None:
    """`dvc push` every output dvc.lock names to the default remote, after a successful run.

    So that a fresh clone, another machine or `python -m tasks.reproduce` finds this run's data and
    models there. A push that fails fails nothing: the run's outputs are in the local cache, and one
    warning names the remote, the reason and `dvc push`, which sends them later.
    """
    from dvc.exceptions import DvcException

    remote = repo.config["core"].get("remote")
    if not remote:
        return
    url = repo.config["remote"].get(remote, {}).get("url", "?")
    try:
        with quiet_dvc():
            pushed = repo.push()
    except (DvcException, ImportError, OSError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        logger.warning(
            f"push: DVC remote '{remote}' ({url}) did not take this run's outputs: {reason}; they are in the "
            "local cache: `dvc push` sends them once the remote is back"
        )
        return
    logger.info(f"push: {pushed} new files to DVC remote '{remote}' ({url}); `dvc pull` gets them anywhere")


def checkpoint_files(root: Path = Path()) -> list[str]:
    from tasks.paths import CHECKPOINTS

    folder = root / CHECKPOINTS
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def take_back(path: Path, text: str, overrides: list[str], logger: Any) -> None:
    """Put the params file back as it was before the overrides: the run they were for failed."""
    from tasks.files import write_text

    write_text(path, text)
    taken = " ".join(overrides)
    logger.warning(f"{path}: the overrides {taken} were taken back: the run failed before any step completed")


@flow(name="pipeline", flow_run_name=run_title, log_prints=True)
def pipeline(
    params_path: str = str(PARAMS_FILE), overrides: list[str] | None = None, force: bool = False, pull: bool = False
) -> dict:
    """Run the stale steps in order (all of them with `force`); return what each step returned.

    `pull`: first `dvc pull` the data and outputs from the default DVC remote, if one is configured.
    A run that fails before any step completed, and before training wrote a checkpoint, leaves the
    params file as it found it.
    """
    from prefect import get_run_logger

    from flows.server import close_crashed_flow_runs

    path = Path(params_path)
    logger = get_run_logger()
    results: dict[str, Any] = {}
    with checkout_lock() as repo:
        close_crashed_flow_runs()
        if repo is not None and path.resolve() != (Path(repo.root_dir) / PARAMS_FILE).resolve():
            raise ConfigError(
                f"--params {path}: in a DVC repository the params are {PARAMS_FILE}, which dvc.lock records; "
                "edit it or use --set"
            )
        params = load(path, overrides or [])  # checked here too, for a deployment's parameters, before anything runs
        if pull and repo is not None:
            pull_data(repo, logger)
        original = path.read_text() if overrides else None
        if overrides:
            write_overrides(path, overrides)
        checkpoints = checkpoint_files()
        try:
            run_steps(repo, path, params, force, results)
        except Exception:
            # Taken back only if nothing was made with them: no step completed, and no checkpoint was
            # written (an interrupted training resumes from its checkpoints with the same params).
            # Not after Ctrl-C or a cancel either: the user runs again with the same params to go on.
            nothing = not any(r != "up to date" for r in results.values()) and checkpoint_files() == checkpoints
            if original is not None and nothing:
                take_back(path, original, overrides, logger)
            raise
        if repo is not None:
            push_outputs(repo, logger)
    return results


# What a step adds to the model's MLflow run besides files. DVC finds these steps up to date in a
# fresh clone (evaluate's outputs are all in git, promote has none), while that clone's first run,
# in its own store, has neither the test metrics nor a registry decision.
RECORDED = {"evaluate": ("metrics", "test/accuracy"), "promote": ("tags", "promote.decision")}


def missing_from_run(stage: str) -> bool:
    """Whether the MLflow run of the checkout's model lacks what `stage` adds to it: then it runs anyway."""
    from prefect import get_run_logger

    from tasks import paths, tracking

    if stage not in RECORDED or not paths.BEST.exists():
        return False
    part, key = RECORDED[stage]
    try:
        run_id = tracking.current_run_id(paths.BEST)
        with tracking.store():
            run = tracking.client().get_run(run_id)
    except PipelineError:  # no run of this model in this store: the step itself would fail the same way
        return False
    if key in getattr(run.data, part):
        return False
    get_run_logger().info(
        f"{stage}: DVC finds it up to date, but MLflow run {run_id} has no {key}: running it", extra={"stage": stage}
    )
    return True


def run_steps(repo: Any, path: Path, params: Params, force: bool, results: dict[str, Any]) -> None:
    """The steps, in order; each one that ran is committed to dvc.lock and recorded in `results`."""
    from prefect import get_run_logger

    from tasks import naming

    logger = get_run_logger()
    params_path = str(path)
    name = flow_run.name  # run_title's, from the same params
    params_artifact(params, naming.changes(params, naming.committed_params(path)))
    before = test_metrics()
    tags = {
        "orchestrator": "prefect",
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": name,
        "mlflow.runName": name,  # the MLflow run, if train runs, is called like this flow run
    }
    if url := url_for("flow-run", obj_id=flow_run.id):  # None without a server (Prefect's ephemeral mode)
        tags["prefect.flow_run_url"] = url
    try:
        for stage in STAGES:
            if repo is not None and not force and not repo.status(targets=[stage]) and not missing_from_run(stage):
                STEP_TASKS[stage](stage, params_path, tags, up_to_date=True)
                logger.info(f"{stage}: up to date", extra={"stage": stage})  # the terminal drops "stage: "
                results[stage] = "up to date"
                continue
            if STAGES.index(stage) <= STAGES.index("export"):
                # Export's fresh process, started with the first step (later ones find it waiting): its
                # imports (about 3 s) use the core that this process leaves idle now, not the export's time.
                checker.start_ahead()
            try:
                results[stage] = STEP_TASKS[stage](stage, params_path, tags)
            except PipelineError as exc:
                exc.args = (f"{stage}: {exc}",)  # the flow run's message, and the terminal's line, name the step
                raise
            if repo is not None:
                repo.commit(stage, force=True)
                logger.info(f"{stage}: committed to dvc.lock", extra={"stage": stage})
    finally:
        checker.stop_ahead()  # unused when the export turned out up to date or did not run
    results_artifact(name, before, results)


def summary() -> str:
    """Where the results are, for the end of a run."""
    from tasks.paths import EXPORT_INFO as INFO
    from tasks.paths import TEST_METRICS as METRICS
    from tasks.tracking import noted_run, run_url, runs_list_link, tracking_uri

    if not METRICS.exists() or not INFO.exists():
        return "no results yet"
    test = json.loads(METRICS.read_text())["test"]
    run = noted_run()
    if "run_id" in run and "tracking_uri" in run:
        where = f"MLflow run {run['run_id']} in {run['tracking_uri']}"
        if run["tracking_uri"] == tracking_uri():
            with contextlib.suppress(PipelineError):
                where += f": {run_url(run['run_id'])}"
    else:
        where = f"MLflow runs in {tracking_uri()}"
    return "\n".join(
        [
            f"test accuracy {test['accuracy']:.4f}, macro F1 {test['f1_macro']:.4f}  ({METRICS}; `dvc metrics show`)",
            f"exported model: {INFO.parent}/  (model.ts TorchScript, model.pt2 torch.export, "
            f"model_state.pt state dict; how to apply it: {INFO})",
            "plots: plots/confusion.png, plots/train.csv  (`dvc plots show` writes dvc_plots/index.html)",
            where,
            f"MLflow UI: bash scripts/mlflow-ui.sh, then open {runs_list_link()}",
        ]
    )


def main(args: argparse.Namespace) -> None:
    from flows.server import without_heartbeats

    stop_on_sigterm()
    with user_errors(), without_heartbeats():
        pipeline(params_path=str(args.params), overrides=args.overrides or None, force=args.force, pull=args.pull)
    print(summary())


if __name__ == "__main__":
    main(ARGS)
