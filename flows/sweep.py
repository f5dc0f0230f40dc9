"""A sweep: many trainings with different params, run side by side, and the best of them.

    python -m flows.sweep sweeps/lr.yaml                  # trials as parallel Prefect tasks
    python -m flows.sweep sweeps/lr.yaml --parallel 4     # at most 4 at once
    python -m flows.sweep sweeps/lr.yaml --dask           # on a local Dask cluster (prefect-dask)
    python -m flows.sweep sweeps/lr.yaml --dask tcp://scheduler:8786   # on a running Dask cluster
    python -m flows.sweep sweeps/lr.yaml --fresh          # forget this sweep's earlier trials

The sweep file names the params to vary, as a grid or as random draws (see `sweeps/lr.yaml` and
`sweeps/random.yaml`). Every trial is a Prefect task that runs build, train and evaluate in a
process and folder of its own (`flows/trial.py`), under `.sweeps/<name>-<key>/trial-<n>/`, on
params.yaml plus the sweep's values: params.yaml itself is never written, and the checkout's
outputs and dvc.lock are not touched. The trials share the prepared data, prepared once per
distinct `prepare` section. In MLflow the sweep is one parent run with a nested run per trial, so
the UI's compare view shows them side by side. A sweep stopped (Ctrl-C, SIGTERM, a crash) and
started again runs only the trials that have no result; a trial's training resumes from its
checkpoint. The best trial is picked by the sweep's metric (on the validation split by default:
picking by the test split would make its score optimistic), and printed with the command that
makes it the pipeline's params.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from tasks.paths import PARAMS_FILE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/lr.yaml")
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params the trials start from (%(default)s)")
    p.add_argument("--parallel", type=int, help="trials at once (default: the file's `parallel`, or up to 4 cores)")
    p.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the trials on Dask: a local cluster, or the scheduler at ADDRESS (tcp://host:8786)",
    )
    p.add_argument("--fresh", action="store_true", help="forget the trials this sweep finished before; run them all")
    return p


if __name__ == "__main__":
    ARGS = parser().parse_args()  # --help before pydantic and the rest (a tenth of a second)

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator  # noqa: E402

from tasks.errors import ConfigError, PipelineError  # noqa: E402
from tasks.params import Params, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(".sweeps")
METRICS = ("val/accuracy", "val/loss", "test/accuracy", "test/f1_macro", "test/loss")
MAX_TRIALS = 1000
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a folder name, and part of a Prefect artifact key


# The sweep file ------------------------------------------------------------------------------------------------------


def _first_in(section: str) -> str:
    return next(k for k in Params().flat() if k.startswith(section + ".")).removeprefix(section + ".")


def first_error(exc: ValidationError, model: type[BaseModel], what: str) -> str:
    """`where: what is wrong` for the first error; a misspelt key first, with the keys there are."""
    error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
        message = f"not a {what} key; the keys are {', '.join(model.model_fields)}"
    return f"{where}: {message}" if where else message


class Distribution(BaseModel):
    """A random draw between two bounds: `{log_uniform: [0.0001, 0.1]}`, `{uniform: [0, 0.5]}`, `{int_uniform: [8, 64]}`

    (both bounds included).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int_uniform: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [(k, v) for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, int_uniform, as [low, high]")
        kind, (low, high) = given[0]
        if not low < high:
            raise ValueError(f"{kind}: low must be below high, got [{low}, {high}]")
        if kind == "log_uniform" and low <= 0:
            raise ValueError(f"log_uniform: both bounds must be above 0, got [{low}, {high}]")
        return self

    def scipy(self) -> Any:
        from scipy import stats

        if self.uniform:
            return stats.uniform(self.uniform[0], self.uniform[1] - self.uniform[0])
        if self.log_uniform:
            return stats.loguniform(*self.log_uniform)
        return stats.randint(self.int_uniform[0], self.int_uniform[1] + 1)


class Spec(BaseModel):
    """What a sweep file says. Params are named as with `--set`: `train.lr`, `build.channels`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=NAME)] | None = None
    method: Literal["grid", "random"] = "grid"
    trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    metric: Literal[METRICS] = "val/accuracy"  # type: ignore[valid-type]
    parallel: Annotated[int, Field(ge=1, le=256)] | None = None
    params: dict[str, Any] = {}
    space: Annotated[dict[str, Annotated[list[Any], Field(min_length=1)] | Distribution], Field(min_length=1)]

    @field_validator("params", "space")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """One value per dotted name: a whole section (`train:`) would replace every param in it."""
        sections = {k.rsplit(".", 1)[0] for k in Params().flat() if "." in k}
        sections |= {s.rsplit(".", 1)[0] for s in list(sections) if "." in s}
        for key in value:
            if not key or key.startswith(".") or key.endswith(".") or " " in key or "=" in key:
                raise ValueError(f"'{key}' is not a param name; name params as with --set, e.g. train.lr")
            if key in sections:
                raise ValueError(f"'{key}' is a section; name each param in it, e.g. {key}.{_first_in(key)}")
        return value

    @field_validator("space", mode="before")
    @classmethod
    def _dimensions(cls, value: Any) -> Any:
        """Each param: a list of values, or one distribution; said per param, not as pydantic's union errors."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, dimension in value.items():
            if isinstance(dimension, dict):
                try:
                    out[key] = Distribution.model_validate(dimension)
                except ValidationError as exc:
                    raise ValueError(f"{key}: {first_error(exc, Distribution, 'distribution')}") from None
            elif isinstance(dimension, list) and dimension:
                out[key] = dimension
            else:
                raise ValueError(
                    f"{key}: give a list of values, e.g. [0.001, 0.01], or a distribution, e.g. "
                    "{log_uniform: [0.0001, 0.1]}"
                )
        return out

    @model_validator(mode="after")
    def _method(self) -> Spec:
        drawn = [k for k, v in self.space.items() if isinstance(v, Distribution)]
        if self.method == "grid":
            if drawn:
                raise ValueError(
                    f"a grid takes lists of values; {', '.join(drawn)} has a distribution (method: random)"
                )
            if self.trials is not None:
                raise ValueError("trials is for method: random; a grid runs every combination of its values")
        elif self.trials is None:
            raise ValueError("method: random needs trials, how many draws (e.g. trials: 8)")
        both = sorted(set(self.params) & set(self.space))
        if both:
            raise ValueError(f"{', '.join(both)} is both fixed (params) and swept (space)")
        return self

    @property
    def goal(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"


def read_spec(path: Path) -> Spec:
    """The sweep file, checked; a ConfigError naming the file and the fix otherwise."""
    from ruamel.yaml import YAMLError

    from tasks.params import _yaml

    try:
        raw = _yaml().load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"sweep file {path}: {exc.strerror}") from None
    except YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping with at least `space:`; see sweeps/lr.yaml")
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"sweep file {path}: {first_error(exc, Spec, 'sweep file')}") from None


def expand(spec: Spec) -> list[dict[str, Any]]:
    """The trials' values: every combination of a grid, or `trials` random draws (rounded to 3 significant digits)."""
    from sklearn.model_selection import ParameterGrid, ParameterSampler

    if spec.method == "grid":
        grid = ParameterGrid({k: list(v) for k, v in spec.space.items()})
        if len(grid) > MAX_TRIALS:
            raise ConfigError(f"the grid has {len(grid)} combinations, more than {MAX_TRIALS}; use method: random")
        combos = list(grid)
        order = list(spec.space)  # the file's order, not sklearn's sorted one
        return [{k: combo[k] for k in order} for combo in combos]
    space = {k: v.scipy() if isinstance(v, Distribution) else list(v) for k, v in spec.space.items()}
    size = math.prod(len(v) for v in space.values() if isinstance(v, list))
    if all(isinstance(v, list) for v in space.values()) and spec.trials > size:
        raise ConfigError(f"trials: {spec.trials} random draws from only {size} combinations; use method: grid")
    draws = ParameterSampler(space, n_iter=spec.trials, random_state=spec.seed)
    return [{k: _plain(draw[k], spec.space[k]) for k in spec.space} for draw in draws]


def _plain(value: Any, dimension: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value  # numpy scalars, as YAML and JSON take them
    if isinstance(dimension, Distribution) and dimension.int_uniform is None:
        value = float(f"{value:.3g}")
    return value


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings stay strings, lists stay lists


# The plan: trials, their params and folders ---------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    values: dict[str, Any]  # the swept params
    params: Params
    folder: Path = field(default=Path())
    key: str = ""

    @property
    def overrides(self) -> list[str]:
        return [override(k, v) for k, v in self.values.items()]

    @property
    def label(self) -> str:
        from tasks.naming import _short, _value

        keys = list(self.params.flat())
        return " ".join(f"{_short(k, keys)}={_value(v)}" for k, v in self.values.items())


@dataclass
class Plan:
    path: Path
    spec: Spec
    name: str
    base: Params
    trials: list[Trial]
    key: str
    folder: Path
    parallel: int
    threads: int


def code_sha256() -> str:
    """The code every trial runs (tasks/ and flows/trial.py): another code, another sweep."""
    digest = hashlib.sha256()
    for file in sorted([*(ROOT / "tasks").rglob("*.py"), ROOT / "flows" / "trial.py"]):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def make_plan(path: Path, params_path: Path = PARAMS_FILE, parallel: int | None = None) -> Plan:
    """Every trial's params, checked before anything runs, and where each trial works."""
    spec = read_spec(path)
    fixed = [override(k, v) for k, v in spec.params.items()]
    try:
        base = load(params_path, fixed)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {path}, params: {exc}") from None
    trials = []
    for number, values in enumerate(expand(spec), start=1):
        overrides = [override(k, v) for k, v in values.items()]
        try:
            params = load(params_path, [*fixed, *overrides])
        except ConfigError as exc:
            raise ConfigError(f"sweep file {path}, trial {number} ({' '.join(overrides)}): {exc}") from None
        trials.append(Trial(number, values, params))
    name = spec.name or path.stem
    if not re.fullmatch(NAME, name):
        raise ConfigError(
            f"sweep file {path}: its name '{name}' (from the file name) may have only letters, digits, '.', '_' and "
            "'-'; rename the file or give the sweep a `name:`"
        )
    key = hashlib.sha256(
        json.dumps([[t.params.flat() for t in trials], spec.metric, code_sha256()], sort_keys=True).encode()
    ).hexdigest()
    folder = Path.cwd().resolve() / WORK / f"{name}-{key[:8]}"  # absolute: a Dask worker's own folder differs
    width = len(str(len(trials)))
    for trial in trials:
        trial.folder = folder / f"trial-{trial.number:0{width}d}"
        trial.key = hashlib.sha256(f"{key}:{trial.number}".encode()).hexdigest()[:16]
    cores = os.cpu_count() or 1
    parallel = min(parallel or spec.parallel or min(cores, 4), len(trials))
    return Plan(path, spec, name, base, trials, key, folder, parallel, max(1, cores // parallel))


if __name__ == "__main__":
    # Refuse a bad sweep file before the imports below, which take seconds.
    from flows.server import ensure_server
    from tasks.cli import user_errors

    with user_errors():
        if ARGS.parallel is not None and ARGS.parallel < 1:
            raise ConfigError(f"--parallel {ARGS.parallel}: give 1 or more")
        make_plan(ARGS.sweep, ARGS.params, ARGS.parallel)
        ensure_server()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.urls import url_for  # noqa: E402

from flows import logs  # noqa: E402
from flows import trial as runner  # noqa: E402  (the trial processes: started and stopped by this module)

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
    from tasks import tracking

    logger = get_run_logger()
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


def main(args: argparse.Namespace) -> None:
    import signal

    from tasks.cli import fail, stop_on_sigterm, user_errors

    stop_on_sigterm()
    with user_errors():
        plan = make_plan(args.sweep, args.params, args.parallel)
        if args.dask is None:
            runner.forkserver()  # its imports overlap the flow's start, not only the sweep's set-up
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


if __name__ == "__main__":
    main(ARGS)
