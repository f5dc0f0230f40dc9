"""`params.yaml`, validated into typed objects before any work starts.

Light on purpose (pydantic and YAML only): `--help` and config errors never import torch,
Prefect or MLflow. A bad file gives one line naming the key, the value and what is allowed:

    params.yaml: train.epocs: unknown key (did you mean 'epochs'?)
"""

from __future__ import annotations

import copy
import difflib
import io
import os
import shutil
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import ConfigError, PipelineError
from tasks.paths import PARAMS_FILE

__all__ = ["PARAMS_FILE", "ConfigError", "Params", "load", "write_overrides"]


class Section(BaseModel):
    # No hidden defaults, no infinities: what params.yaml says is what runs, and `.inf` is not a rate.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class Prepare(Section):
    dataset: Literal["digits", "imagefolder", "mnist", "fashion_mnist"] = "digits"
    root: str = "data/raw"
    image_size: Annotated[int, Field(ge=4, le=1024)] | None = None
    channels: Literal[1, 3] | None = None
    resize: Literal["crop", "pad", "stretch"] = "crop"
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    download: bool = False
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Prepare:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9, to leave data for training")
        if self.dataset == "imagefolder" and self.image_size is None:
            raise ValueError(
                "dataset 'imagefolder' needs image_size (pixels per side): the images differ in size, "
                "and a batch needs one; e.g. --set prepare.image_size=64"
            )
        return self


TORCHVISION_MODELS = ("resnet18", "mobilenet_v3_small")


class Build(Section):
    model: Literal["mlp", "cnn", "resnet18", "mobilenet_v3_small"] = "cnn"
    hidden: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [128]
    channels: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=4)] = [32, 64]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weights: str | None = None
    freeze_backbone: bool = False

    @model_validator(mode="after")
    def _weights_for_torchvision(self) -> Build:
        if self.model not in TORCHVISION_MODELS and (self.weights is not None or self.freeze_backbone):
            raise ValueError(
                f"weights and freeze_backbone are for the torchvision models ({', '.join(TORCHVISION_MODELS)}), "
                f"not '{self.model}'"
            )
        if self.freeze_backbone and self.weights is None:
            raise ValueError("freeze_backbone needs weights: a frozen backbone with random weights learns nothing")
        return self


class Augment(Section):
    crop_scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    hflip: Annotated[float, Field(ge=0, le=1)] = 0.0
    rotation: Annotated[float, Field(ge=0, le=180)] = 0.0
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0

    @property
    def active(self) -> bool:
        return self.crop_scale < 1 or self.hflip > 0 or self.rotation > 0 or self.color_jitter > 0


class Schedule(Section):
    name: Literal["constant", "step", "cosine", "onecycle", "plateau"] = "constant"
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    step_epochs: Annotated[int, Field(ge=1)] = 10
    gamma: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: Annotated[int, Field(ge=0)] = 2
    min_lr: Annotated[float, Field(ge=0)] = 0.0


class EarlyStopping(Section):
    patience: Annotated[int, Field(ge=0)] = 0
    min_delta: Annotated[float, Field(ge=0)] = 0.0


class Checkpoint(Section):
    every_steps: Annotated[int, Field(ge=0)] = 0
    keep: Annotated[int, Field(ge=1, le=1000)] = 2


class Train(Section):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.003
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 0.0001
    decay_norms_and_biases: bool = True
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    schedule: Schedule = Schedule()
    clip_grad_norm: Annotated[float, Field(ge=0)] = 0.0
    accumulate: Annotated[int, Field(ge=1, le=1024)] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    select_metric: Literal["val/accuracy", "val/loss"] = "val/accuracy"
    early_stopping: EarlyStopping = EarlyStopping()
    divergence_factor: Annotated[float, Field(gt=1)] = 10.0
    chance_epochs: Annotated[int, Field(ge=0)] = 3
    augment: Augment = Augment()
    checkpoint: Checkpoint = Checkpoint()
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _schedule_fits(self) -> Train:
        if self.schedule.name == "onecycle" and self.schedule.warmup_epochs:
            raise ValueError("schedule onecycle warms up by itself: set schedule.warmup_epochs to 0")
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({self.schedule.warmup_epochs:g}) must be below epochs ({self.epochs})"
            )
        return self


class Evaluate(Section):
    batch_size: Annotated[int, Field(ge=1)] = 512


class Export(Section):
    atol: Annotated[float, Field(gt=0, le=1)] = 1e-5


class Promote(Section):
    # A registry name that is also a plain URI part: models:/<name>@champion
    registered_model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")] = "classifier"
    metric: Literal["test/accuracy", "test/f1_macro", "test/loss"] = "test/accuracy"
    margin: Annotated[float, Field(ge=0)] = 0.0
    from_dirty: bool = False


class Params(Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    prepare: Prepare = Prepare()
    build: Build = Build()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    export: Export = Export()
    promote: Promote = Promote()

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.003, ...}`: the names MLflow and `--set` use."""
        return _flatten(self.model_dump())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


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


def _yaml() -> Any:
    """The parser DVC reads params.yaml with (ruamel, YAML 1.2, duplicate keys refused), so both agree."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=0.01"` -> `(["train", "lr"], 0.01)`; the value is read as YAML."""
    from ruamel.yaml import YAMLError

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set train.lr=0.01")
    try:
        value = _yaml().load(raw) if raw.strip() else raw
    except YAMLError:
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
    from ruamel.yaml import YAMLError
    from ruamel.yaml.constructor import DuplicateKeyError

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the project root, or pass --params PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = _yaml().load(text)
    except DuplicateKeyError as exc:
        # DVC refuses such a file too: which of the two values would it mean?
        key = str(exc.problem).split('"')[1] if '"' in str(exc.problem) else "?"
        raise ConfigError(
            f"{path}: line {exc.problem_mark.line + 1}: duplicate key '{key}'; keep one of the two values"
        ) from None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty; it must hold seed and the sections {', '.join(_sections())} "
            "(restore it with `git checkout params.yaml`)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (prepare:, build:, ...), got {type(data).__name__}")
    return data


def _sections() -> list[str]:
    return [name for name, field in Params.model_fields.items() if isinstance(field.default, BaseModel)]


def _missing(data: dict[str, Any], source: str) -> str | None:
    """Keys the file leaves out: each must be written down, as DVC records only what the file says."""
    missing = _missing_keys(data, Params().model_dump(), "")
    if not missing:
        return None
    more = f"; and {len(missing) - 4} more" if len(missing) > 4 else ""
    return (
        f"{source}: "
        + "; ".join(missing[:4])
        + more
        + "; write every key down (the project's params.yaml lists them all)"
    )


def _missing_keys(data: dict[str, Any], defaults: dict[str, Any], prefix: str) -> list[str]:
    missing = []
    for name, default in defaults.items():
        if name not in data:
            what = "missing section" if isinstance(default, dict) else f"missing (default {default!r})"
            missing.append(f"{prefix}{name}: {what}")
        elif isinstance(default, dict) and isinstance(data[name], dict):
            missing += _missing_keys(data[name], default, f"{prefix}{name}.")
    return missing


def validate(data: dict[str, Any], source: str = str(PARAMS_FILE)) -> Params:
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, source) for e in exc.errors())) from None
    problem = _missing(data, source)
    if problem:
        raise ConfigError(problem)
    return params


def load(path: Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raises `ConfigError` with a one-line message."""
    raw = read_raw(path)
    return validate(apply_overrides(raw, overrides or []), source=str(path))


def check_writable(path: Path) -> None:
    """Refuse, rather than replace, a file its owner marked read-only (a rename would ignore the mark)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise ConfigError(
            f"{path}: the file is read-only, and --set writes the overrides into it; "
            f"make it writable (chmod u+w {path}) or run without --set"
        )


def write_overrides(path: Path, overrides: list[str]) -> Params:
    """Validate overrides, then write them into the params file with its comments kept.

    As `dvc exp run -S` does: the file then says what the next run uses, and `dvc repro` and the
    flow agree on what is stale. What is written is the validated value (`1e-3` becomes the
    number 0.001). A read-only file is refused, not replaced. Returns the validated params.
    """
    from ruamel.yaml import YAML

    from tasks.files import atomic_path

    path = Path(path)
    params = load(path, overrides)
    check_writable(path)
    validated = params.model_dump()
    rt = YAML()
    # `null` stays `null`: ruamel would write it as nothing after the colon.
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for text in overrides:
        keys, _ = parse_override(text)
        value = validated
        for key in keys:
            value = value[key]
        _set(doc, keys, value, text)
    buf = io.StringIO()
    rt.dump(doc, buf)
    target = path.resolve()  # through a symlink, not over it
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(buf.getvalue())
            shutil.copymode(target, tmp)  # the user's permissions stay
    except (OSError, PipelineError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{path}: cannot write the overrides into it ({reason})") from None
    return params
