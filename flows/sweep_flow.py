"""The sweep as a Prefect flow: a task per trial, the best of them, and their MLflow parent run.

`python -m flows.sweep` (`flows/sweep.py`) checks the sweep file and starts it; `flows/sweep_plan.py`
makes the plan (every trial's params and folder); `flows/trial.py` runs each trial in a process of
its own. See `flows/sweep.py` for what a sweep does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from flows import logs
from flows import trial as runner  # the trial processes: started and stopped by this module
from flows.sweep_plan import METRICS, ROOT, Plan, Trial, make_plan, override
from tasks.errors import PipelineError
from tasks.params import PARAMS_FILE, Params

logs.install(logs.PrefixFormatter())
# Dask's own notes (workers starting and closing, a task cancelled on the way out) are not the sweep's news.
logging.getLogger("distributed").setLevel(logging.ERROR)


# The trials ----------------------------------------------------------------------------------------------------------


class TrialError(PipelineError):
    """A trial failed; its message is the trial's own last error line."""


def shown(path: Path) -> str:
    """A path as the terminal shows it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def store_uri() -> str:
    """The tracking store, with a SQLite file's path made absolute: the trials work in other folders."""
    from tasks import tracking

    uri = tracking.tracking_uri()
    db = tracking._sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def log_size(folder: Path) -> int:
    try:
        return (folder / "trial.log").stat().st_size
    except OSError:
        return 0


def last_error(folder: Path, start: int = 0) -> str:
    """The attempt's own one-line error (its log from byte `start`), or the end of that log."""
    try:
        with open(folder / "trial.log", "rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


def read_result(folder: Path, key: str | None = None) -> dict | None:
    try:
        result = json.loads((folder / runner.RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and (key is None or result.get("key") == key) else None


def link(source: Path, target: Path) -> None:
    """`source` becomes a link to `target` (relative, so the sweep folder can move with the checkout)."""
    source.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink() or source.exists():
        if source.is_symlink() and source.resolve() == target.resolve():
            return
        if source.is_dir() and not source.is_symlink():
            shutil.rmtree(source)
        else:
            source.unlink()
    source.symlink_to(os.path.relpath(target, source.parent), target_is_directory=True)


def write_params(folder: Path, params: Params) -> None:
    from tasks.files import write_text

    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "params.yaml", json.dumps(params.model_dump(), indent=2) + "\n")  # JSON is YAML


@task(name="prepare", task_run_name="prepare {label}", cache_policy=NO_CACHE)
def prepare(folder: Path, params: Params, label: str, threads: int, checkout: Path, store: str) -> str:
    """Prepare the data once for the trials that share this `prepare` section."""
    from tasks import paths

    logger = get_run_logger()
    if (read_result(folder, key=folder.name) or {}).get("status") == "finished":
        logger.info(f"prepared before: {shown(folder / paths.PREPARED)}")
        return str(folder)
    write_params(folder, params)
    root = Path(params.prepare.root)
    if not root.is_absolute() and (checkout / root).exists():
        link(folder / root, checkout / root)  # the checkout's raw data, at the same relative path
    (folder / runner.TRIAL).write_text(json.dumps({"key": folder.name}))
    start = log_size(folder)
    code = runner.start(folder, ["prepare"], threads, store)
    if code != 0:
        log = shown(folder / "trial.log")
        raise TrialError(f"prepare failed (exit {code}): {last_error(folder, start)}; its log: {log}")
    logger.info(f"prepared: {shown(folder / paths.PREPARED)}")
    return str(folder)


@task(name="trial", task_run_name="trial {number}: {label}", cache_policy=NO_CACHE)
def trial(
    number: int, label: str, folder: Path, prepared: str, params: Params, tags: dict, threads: int, store: str
) -> dict:
    """build, train and evaluate one configuration in its own folder and process; its result."""
    from tasks import paths

    logger = get_run_logger()
    write_params(folder, params)
    for shared in (paths.PREPARED, paths.DATA_COUNTS.parent):
        link(folder / shared, Path(prepared) / shared)
    key = tags["sweep.trial_key"]
    (folder / runner.TRIAL).write_text(json.dumps({"key": key, "tags": tags}))
    (folder / runner.RESULT).unlink(missing_ok=True)
    logger.info(f"started in {shown(folder)} (log: {shown(folder / 'trial.log')})")
    start = log_size(folder)
    code = runner.start(folder, ["build", "train", "evaluate"], threads, store)
    result = read_result(folder, key)
    if code != 0 or result is None or result["status"] != "finished":
        log = shown(folder / "trial.log")
        raise TrialError(f"trial {number} ({label}) failed: {last_error(folder, start)}; its log: {log}")
    m = result["metrics"]
    logger.info(
        f"val/accuracy {m['val/accuracy']:.4f}, test/accuracy {m.get('test/accuracy', float('nan')):.4f} "
        f"(best epoch {m['best_epoch']:.0f}) in {result['seconds']:.0f} s; MLflow run {result['run_id']}"
    )
    return result


# The sweep -----------------------------------------------------------------------------------------------------------


def parent_run(plan: Plan, tags: dict[str, str]) -> str:
    """The sweep's MLflow run: the one an earlier start of this very sweep opened, or a new one."""
    from tasks import naming, tracking
    from tasks.files import write_text

    note = plan.folder / "sweep.json"
    try:
        run_id = json.loads(note.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        run_id = None
    if run_id:
        from mlflow.exceptions import MlflowException

        with tracking.store():
            try:
                found = tracking.client().get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # a store away for a moment: a TrackingError, and the results stay
                found = None  # another store, or the run was deleted for good
        if found is not None and found.info.lifecycle_stage == "active":
            tracking.reopen_run(run_id, tags)
            return run_id
    swept = set(plan.spec.space)
    params = {k: v for k, v in plan.base.flat().items() if k not in swept}
    params.update(
        {
            "sweep.method": plan.spec.method,
            "sweep.trials": len(plan.trials),
            "sweep.metric": plan.spec.metric,
            "sweep.space": json.dumps(plan.spec.model_dump(mode="json", exclude_none=True)["space"])[:6000],
        }
    )
    changed = naming.changes(plan.base, naming.committed_params(PARAMS_FILE))
    tags = {**tags, **tracking.git_tags(PARAMS_FILE, bool(changed))}
    run_id = tracking.start_run(params, tags, name=tags.pop("mlflow.runName"))
    tracking.log_artifacts(run_id, "sweep", [plan.path])
    write_text(note, json.dumps({"run_id": run_id, "tracking_uri": tracking.tracking_uri()}))
    # The results of earlier trials belong to runs of another parent, gone or in another store: run them again.
    for old in plan.trials:
        (old.folder / runner.RESULT).unlink(missing_ok=True)
    return run_id


def trial_tags(plan: Plan, trial: Trial, parent: str, common: dict[str, str]) -> dict[str, str]:
    fixed = " ".join(override(k, v) for k, v in plan.spec.params.items()) or "none"
    return {
        **common,
        "mlflow.parentRunId": parent,
        "mlflow.runName": f"#{trial.number} {trial.label}",  # nested under the sweep's run: its values say it all
        "mlflow.note.content": (
            f"Trial {trial.number} of {len(plan.trials)} of sweep **{plan.name}** ({plan.path}, {plan.spec.method}):"
            f" `{' '.join(trial.overrides)}`; fixed for every trial: `{fixed}`; the rest as in {PARAMS_FILE}."
        ),
        "sweep.name": plan.name,
        "sweep.trial": str(trial.number),
        "sweep.trial_key": trial.key,
    }


def rank(plan: Plan, results: dict[int, dict]) -> list[Trial]:
    """The finished trials, best first by the sweep's metric."""
    done = [t for t in plan.trials if results.get(t.number, {}).get("status") == "finished"]
    metric, sign = plan.spec.metric, (1 if plan.spec.goal == "min" else -1)
    return sorted(done, key=lambda t: (sign * results[t.number]["metrics"].get(metric, math.inf * sign), t.number))


def table(plan: Plan, results: dict[int, dict], errors: dict[int, str]) -> list[dict[str, Any]]:
    """One row per trial, in trial order: its values, its metrics, how it ended."""
    order = rank(plan, results)
    best = order[0].number if order else None
    rows = []
    for t in plan.trials:
        result = results.get(t.number) or {}
        m = result.get("metrics", {})
        status = result.get("status") or ("failed" if t.number in errors else "not run")
        rows.append(
            {
                "trial": t.number,
                **t.values,
                **{k: round(m[k], 4) if k in m else None for k in METRICS},
                "best epoch": int(m["best_epoch"]) if "best_epoch" in m else None,
                "seconds": result.get("seconds"),
                "status": "best" if t.number == best else status,
                "error": result.get("error") or errors.get(t.number, ""),
                "MLflow run": result.get("run_id") or "",
            }
        )
    return rows


def adopt_command(plan: Plan, trial: Trial) -> str:
    """The pipeline on the trial's params: the sweep's fixed ones and the trial's own, as `--set`s."""
    overrides = [override(k, v) for k, v in plan.spec.params.items()] + trial.overrides
    return "python -m flows.pipeline " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def print_table(plan: Plan, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.naming import _short, _value

    keys = list(plan.base.flat())
    metrics = [m for m in METRICS if not m.endswith("loss") or m == plan.spec.metric]
    columns = ["trial", *plan.spec.space, *metrics, "best epoch", "seconds", "status"]
    view = Table(title=f"sweep {plan.name}: best by {plan.spec.metric} ({plan.spec.goal}imum)", title_justify="left")
    for column in columns:
        view.add_column(_short(column, keys) if column in plan.spec.space else column, justify="right")
    view.columns[-1].justify = "left"
    for row in rows:
        style = "bold green" if row["status"] == "best" else ("red" if row["status"] == "failed" else None)
        cells = [
            ""
            if row[c] is None
            else _value(row[c])
            if c in plan.spec.space
            else f"{row[c]:.4f}"
            if c in METRICS
            else str(row[c])
            for c in columns
        ]
        view.add_row(*cells, style=style)
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # a log file: no wrapped or cut cells
    console.print(view)
    for row in rows:
        if row["error"]:
            console.print(f"trial {row['trial']}: {row['error']}", style="red", soft_wrap=True)


def report(plan: Plan, parent: str, rows: list[dict[str, Any]], results: dict[int, dict]) -> str:
    """The results in MLflow (the parent run) and in Prefect (artifacts); the summary line."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks import tracking
    from tasks.files import write_text

    order = rank(plan, results)
    path = plan.folder / "sweep_results.json"
    write_text(path, tracking.table_json({k: [r[k] for r in rows] for k in rows[0]}))
    tracking.log_table(parent, path)
    if order:
        best = order[0]
        kept = results[best.number]["metrics"]  # val/: the best epoch's, which train logs as best/val_*
        names = {k: k.replace("val/", "best/val_") for k in METRICS}
        tracking.log_metrics(parent, {names[k]: kept[k] for k in METRICS if k in kept})
        tracking.set_tags(
            parent,
            {"sweep.best_trial": str(best.number), "sweep.best_run_id": results[best.number]["run_id"]},
        )
    create_table_artifact(
        [{k: ("" if v is None else v) for k, v in r.items()} for r in rows],
        key=f"sweep-{plan.name.lower().replace('_', '-').replace('.', '-')}",
        description=f"Sweep {plan.name}: every trial, by number; the best by {plan.spec.metric} is marked best.",
    )
    lines = [f"# Sweep {plan.name}", ""]
    try:
        lines.append(f"MLflow parent run: [{parent}]({tracking.run_url(parent)})")
        ids = [r["MLflow run"] for r in rows if r["MLflow run"]]
        with tracking.store():
            experiment = tracking.client().get_run(parent).info.experiment_id
        compare = f"{tracking.ui_url()}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment])}"
        lines.append(f"Compare the trials: [{len(ids)} runs side by side]({compare.replace(' ', '')})")
    except PipelineError as exc:
        lines.append(f"MLflow parent run {parent} ({exc})")
    if order:
        best = order[0]
        m = results[best.number]["metrics"]
        summary = (
            f"best: trial {best.number} ({best.label}), {plan.spec.metric} {m[plan.spec.metric]:.4f}"
            + (f", test/accuracy {m['test/accuracy']:.4f}" if "test/accuracy" in m else "")
            + f"; to make it the pipeline's params: {adopt_command(plan, best)}"
        )
    else:
        summary = "no trial finished"
    lines += ["", summary.replace("; to make", ".\n\nTo make").replace(": python", ":\n\n    python")]
    create_markdown_artifact("\n".join(lines), key="sweep-best", description=f"The best trial of sweep {plan.name}")
    return summary


@flow(name="sweep", flow_run_name="sweep {sweep_path}", log_prints=True)
def sweep(
    sweep_path: str, params_path: str = str(PARAMS_FILE), parallel: int | None = None, fresh: bool = False
) -> dict:
    """Run the trials that have no result yet, in parallel; report the best. Returns the results by trial number."""
    from flows.server import close_crashed_flow_runs
    from tasks import tracking

    logger = get_run_logger()
    close_crashed_flow_runs()  # a sweep or pipeline of this checkout killed outright (SIGKILL) left Running
    plan = make_plan(Path(sweep_path), Path(params_path), parallel)
    plan.folder.mkdir(parents=True, exist_ok=True)
    lock = runner.hold(
        plan.folder / "lock", f"this sweep is already running ({shown(plan.folder)} is locked); wait for it, or stop it"
    )
    (plan.folder / "stop").unlink(missing_ok=True)  # left by the last stop: this start runs
    runner.STOPPING.clear()
    if isinstance(FlowRunContext.get().task_runner, ThreadPoolTaskRunner):
        runner.forkserver()  # trials in this process: the server that forks them imports while the sweep sets up
    if fresh:  # under the lock: never the folder of a sweep that is running
        for entry in plan.folder.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    results: dict[int, dict] = {}
    errors: dict[int, str] = {}
    parent = None
    ended = False
    try:
        common = {
            "orchestrator": "prefect",
            "prefect.flow_run_id": str(flow_run.id),
            "sweep.name": plan.name,
            "mlflow.source.name": str(ROOT / "flows" / "sweep.py"),
        }
        if url := url_for("flow-run", obj_id=flow_run.id):
            common["prefect.flow_run_url"] = url
        parent_tags = {
            **common,
            "mlflow.runName": f"sweep {plan.name} ({plan.spec.method}, {len(plan.trials)} trials)",
            "mlflow.note.content": f"Sweep **{plan.name}** from {plan.path}: {plan.spec.method} over "
            f"{', '.join(plan.spec.space)}, {len(plan.trials)} trials, best by {plan.spec.metric}. "
            "Its trials are the nested runs below it.",
            "sweep.key": plan.key,
        }
        parent = parent_run(plan, parent_tags)
        todo: list[Trial] = []
        for t in plan.trials:
            found = read_result(t.folder, t.key)
            if found is not None:
                results[t.number] = found
            else:
                todo.append(t)
        logger.info(
            f"{len(plan.trials)} trials ({plan.spec.method} over {', '.join(plan.spec.space)}): "
            f"{len(plan.trials) - len(todo)} have a result from before, {len(todo)} to run, {plan.parallel} at once "
            f"with {plan.threads} torch threads each; MLflow parent run {parent}"
        )
        # The data, prepared once for each distinct `prepare` section among the trials to run.
        store = store_uri()
        prepared: dict[str, Any] = {}
        futures = {}
        digests = {}
        for t in todo:
            section = json.dumps({"seed": t.params.seed, **t.params.prepare.model_dump()}, sort_keys=True)
            digest = digests[t.number] = hashlib.sha256(section.encode()).hexdigest()[:8]
            if digest not in prepared:
                prepared[digest] = prepare.submit(
                    plan.folder / f"prepare-{digest}", t.params, digest, plan.threads, Path.cwd().resolve(), store
                )
            tags = trial_tags(plan, t, parent, common)
            futures[t.number] = trial.submit(
                t.number, t.label, t.folder, prepared[digest], t.params, tags, plan.threads, store
            )
        for t in todo:
            future = futures[t.number]
            future.wait()
            if future.state.is_completed():
                results[t.number] = future.result()
                continue
            found = read_result(t.folder, t.key)  # a failure the same params meet again is kept
            if found is not None:
                results[t.number] = found
            upstream = prepared[digests[t.number]]
            failed = upstream if not upstream.state.is_completed() else future  # a failed prepare: its error
            try:
                failed.result()
            except Exception as exc:
                errors[t.number] = " ".join(str(exc).split()) or type(exc).__name__  # one line, as every error here
        rows = table(plan, results, errors)
        print_table(plan, rows)
        summary = report(plan, parent, rows, results)
        logger.info(summary)
        unfinished = [t.number for t in plan.trials if t.number not in results]
        finished = rank(plan, results)
        tracking.end_run(parent, "FINISHED" if finished and not unfinished else "FAILED")
        ended = True
        if not finished:
            first = next((r["error"] for r in rows if r["error"]), "none recorded")
            raise TrialError(f"no trial of sweep {plan.name} finished; the first error: {first}")
        if unfinished:
            raise TrialError(
                f"trials {', '.join(map(str, unfinished))} did not finish (see the table); run the sweep again "
                "to run only those"
            )
        return results
    except BaseException as exc:
        if not isinstance(exc, PipelineError):  # stopped (Ctrl-C, SIGTERM) or crashed: no trial goes on
            runner.stop_all(plan.folder)
        if parent is not None and not ended:
            with contextlib.suppress(PipelineError):
                tracking.end_run(parent, "KILLED" if not isinstance(exc, Exception) else "FAILED")
        raise
    finally:
        lock.close()


def task_runner(address: str | None, parallel: int) -> Any:
    """Prefect's threads, or Dask: a LocalCluster of `parallel` one-thread workers, or the cluster at `address`."""
    if address is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        # A trial waits in its thread for its prepare task, which was submitted, and so started, before it.
        return ThreadPoolTaskRunner(max_workers=parallel)
    from prefect_dask import DaskTaskRunner

    if address == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": parallel,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )
    return DaskTaskRunner(address=address)


def main(args: argparse.Namespace, plan: Plan) -> None:
    """The command line's sweep: `plan` is what `flows/sweep.py` made of the same args when it checked them."""
    import signal

    from flows.server import without_heartbeats
    from tasks.cli import fail, stop_on_sigterm, user_errors

    stop_on_sigterm()
    with user_errors(), without_heartbeats():
        executor = task_runner(args.dask, plan.parallel)
        try:
            sweep.with_options(task_runner=executor)(
                sweep_path=str(args.sweep), params_path=str(args.params), parallel=args.parallel, fresh=args.fresh
            )
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
            done = sum(read_result(t.folder, t.key) is not None for t in plan.trials)
            fail(
                f"sweep {plan.name} {how}: {done} of {len(plan.trials)} trials have a result; the same command "
                "again runs only the others (their trainings resume from their checkpoints)",
                128 + signum,
            )
