"""The sweep file, checked, and the plan it makes: every trial's params, key and folder.

Without Prefect: `python -m flows.sweep` refuses a bad sweep file with one line before Prefect's
import, and the tests check sweep files without it. The file's format is in `sweeps/lr.yaml` and
`sweeps/random.yaml`; `flows/sweep_flow.py` runs the plan.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError
from tasks.params import PARAMS_FILE, Params, load

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
