"""`params.yaml`, validated into typed objects before any work starts.

Light on purpose (pydantic and YAML only): `--help` and config errors never import torch,
Prefect or MLflow. A bad file gives one line naming the key, the value and what is allowed:

    params.yaml: train.epocs: unknown key (did you mean 'epochs'?)
"""

from __future__ import annotations

import copy
import difflib
import io
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")


class ConfigError(Exception):
    """A problem with params.yaml or an override; its message is meant for the user as-is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class Prepare(Section):
    dataset: Literal["digits"] = "digits"
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Prepare:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9, to leave data for training")
        return self


class Build(Section):
    model: Literal["mlp", "cnn"] = "cnn"
    hidden: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [128]
    channels: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=4)] = [32, 64]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1


class Train(Section):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.003
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 0.0001
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    select_metric: Literal["val/accuracy", "val/loss"] = "val/accuracy"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Evaluate(Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


class Export(Section):
    atol: Annotated[float, Field(gt=0, le=1)] = 1e-5


class Params(Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    prepare: Prepare = Prepare()
    build: Build = Build()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    export: Export = Export()

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.003, ...}`: the names MLflow and `--set` use."""

        def walk(prefix: str, value: Any) -> dict[str, Any]:
            if isinstance(value, dict):
                out: dict[str, Any] = {}
                for key, sub in value.items():
                    out.update(walk(f"{prefix}.{key}" if prefix else key, sub))
                return out
            return {prefix: value}

        return walk("", self.model_dump())


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
        return f"{source}: {path}: unknown key ({hint})"
    msg = error["msg"].removeprefix("Value error, ")
    return f"{source}: {path}: got {error['input']!r}; {msg[0].lower()}{msg[1:]}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=0.01"` -> `(["train", "lr"], 0.01)`; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(tree: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text!r}: {key} is not a section")
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `KEY=VALUE` in a copy of the raw params; unknown keys are caught by `validate`."""
    data = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        _set(data, keys, value, text)
    return data


def read_raw(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the project root, or pass --params PATH)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (prepare:, build:, ...), got {type(data).__name__}")
    return data


def validate(data: dict[str, Any], source: str = str(PARAMS_FILE)) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, source) for e in exc.errors())) from None


def load(path: Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raises `ConfigError` with a one-line message."""
    raw = read_raw(path)
    return validate(apply_overrides(raw, overrides or []), source=str(path))


def write_overrides(path: Path, overrides: list[str]) -> Params:
    """Validate overrides, then write them into the params file with its comments kept.

    As `dvc exp run -S` does: the file then says what the next run uses, and `dvc repro` and the
    flow agree on what is stale. What is written is the validated value (`1e-3` becomes the
    number 0.001, not the string YAML 1.1 reads). Returns the validated params.
    """
    from ruamel.yaml import YAML

    from tasks.files import write_text

    params = load(path, overrides)
    validated = params.model_dump()
    rt = YAML()
    doc = rt.load(Path(path).read_text())
    for text in overrides:
        keys, _ = parse_override(text)
        value = validated
        for key in keys:
            value = value[key]
        _set(doc, keys, value, text)
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(path, buf.getvalue())
    return params
