"""An exported model, loaded once and checked, with the input contract its `model.json` records.

`load(source)` takes what a user names with `--model`:

- nothing: the project's last export, `models/export/` (run from the project root);
- a folder holding `model.json` and the exported files, or one of the files: `model.ts`
  (TorchScript) or `model.pt2` (`torch.export`);
- an MLflow reference, `models:/<name>@<alias>`, `models:/<name>/<version>` or `runs:/<run id>`:
  the run's `export/` artifacts (`model.pt2` and `model.json`) from the store that
  `MLFLOW_TRACKING_URI` names (else the project's `sqlite:///mlflow.db`). Only then is MLflow imported.

Before a model is handed out it must pass every check, so a server never answers with a
half-loaded one: `model.json` is readable and has the preprocessing contract, the file's SHA-256
is the one `model.json` records (they come from the same export), the file loads, and a test
image decoded by that contract, with a black one, gives one finite probability per class each.
Each failure is one `ModelError` whose message names the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.preprocess import Decoded, decode, to_levels

DEFAULT = Path("models/export")  # the project's last export (paths relative to the project root)
RUN_NOTE = Path("models/train/run.json")  # the project's note of the MLflow run that trained it
# The default format, from benchmarks/inference.py (README, "Using the model"): TorchScript answers
# one image in 0.106 ms (p50) against torch.export's 0.373 ms, and 39,215 images/s in batches of 64
# against 34,109; freezing it (torch.jit.freeze) gained nothing measurable, so it is not done.
DEFAULT_FORMAT = "torchscript"
FILES = {"torchscript": "model.ts", "torch_export": "model.pt2"}
SUFFIXES = {".ts": "torchscript", ".pt2": "torch_export"}
REFERENCES = ("models:/", "runs:/")


class ModelError(Exception):
    """The model cannot be used: the message says which file and what to do."""

    exit_code = 4


@dataclass
class Model:
    """A checked model and its contract; `decode` and `probabilities` may be called from several threads."""

    module: object
    info: dict
    file: Path
    format: str
    source: str
    run_id: str | None = None
    sha256: str = ""

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def preprocess(self) -> dict:
        return self.info["preprocess"]

    def decode(self, data: bytes, max_pixels: int | None = None, limit_name: str = "the pixel limit") -> Decoded:
        """One image file's bytes as this model's input pixels (uint8), or the reason they cannot be."""
        p = self.preprocess
        limit = max_pixels or p["max_image_pixels"]
        return decode(data, p["channels"], p["size"], p["resize"], limit, limit_name)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 images (N, C, H, W) as `decode` makes them."""
        import torch

        x = torch.from_numpy(to_levels(images, self.preprocess["max_value"]))
        with torch.inference_mode():
            logits = self.module(x)
        return torch.softmax(logits.float(), dim=1).numpy()

    def describe(self) -> dict:
        """What a user needs to know about the model being served (GET /model)."""
        return {
            "source": self.source,
            "file": str(self.file),
            "format": self.format,
            "sha256": self.sha256,
            "classes": self.classes,
            "input": self.info["input"],
            "preprocess": self.preprocess,
            "mlflow": {"run_id": self.run_id, "run_tag": self.info.get("mlflow_run_tag")},
            "torch": self.info.get("torch"),
        }


def load(source: str | None = None, fmt: str | None = None) -> Model:
    """The model that `source` names (see the module's docstring), checked; `fmt` picks a format of a folder."""
    source = source or str(DEFAULT)
    if source.startswith(REFERENCES):
        with tempfile.TemporaryDirectory(prefix="serve-model-") as tmp:
            run_id = _download(source, Path(tmp))
            model = _load_file(Path(tmp) / FILES["torch_export"], source)  # the registered format
            model.run_id = run_id
            model.file = Path(source)
            return model
    path = Path(source)
    if path.is_dir():
        return _load_file(path / FILES[fmt or DEFAULT_FORMAT], source)
    if path.name == "model.json":
        return _load_file(path.with_name(FILES[fmt or DEFAULT_FORMAT]), source)
    if not path.exists():
        raise ModelError(
            f"{path} does not exist: pass an exported model (a folder with model.json, a .ts or .pt2 file) "
            "or a registry reference such as models:/classifier@champion; `dvc repro export` makes models/export/"
        )
    return _load_file(path, source)


def _load_file(file: Path, source: str) -> Model:
    fmt = SUFFIXES.get(file.suffix)
    if fmt is None:
        raise ModelError(f"{file} is not an exported model: pass a .ts (TorchScript) or .pt2 (torch.export) file")
    if not file.is_file():
        raise ModelError(f"{file} does not exist: `dvc repro export` writes it (or `dvc pull` fetches it)")
    info = _info(file.with_name("model.json"))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    recorded = info.get("sha256", {}).get(fmt)
    if recorded and recorded != digest:
        raise ModelError(
            f"{file} is not the file its model.json describes (SHA-256 {digest[:12]}, model.json says "
            f"{recorded[:12]}): keep the export's files together, as `dvc repro export` wrote them"
        )
    module = _load_module(file, fmt)
    model = Model(module, info, file, fmt, source, _run_id(file, info), digest)
    _check(model)
    return model


def _info(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"there is no {path}: the export writes it beside the model, which cannot be used without it")
    try:
        info = json.loads(path.read_text())
        p = info["preprocess"]
        ok = (
            isinstance(info["classes"], list)
            and info["classes"]
            and p["channels"] in (1, 3)
            and int(p["size"]) > 0
            and p["resize"] in ("crop", "pad", "stretch")
            and int(p["max_value"]) > 0
            and int(p["max_image_pixels"]) > 0
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}): `dvc repro export` writes it again") from None
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ModelError(
            f"{path} lacks the classes or the preprocessing contract (channels, size, resize, max_value): "
            "it predates serving or was edited; `dvc repro export` (or `python -m tasks export`) writes it again"
        )
    return info


def _load_module(file: Path, fmt: str):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation note on every load
            if fmt == "torchscript":
                return torch.jit.load(str(file), map_location="cpu").eval()
            return torch.export.load(str(file)).module()
    except Exception as exc:
        first = _first_line(exc)
        kind = "TorchScript" if fmt == "torchscript" else "torch.export"
        raise ModelError(f"{file} is not a {kind} model torch {torch.__version__} can load: {first}") from None


def _check(model: Model) -> None:
    """Two images, decoded as requests' images are, must give one finite logit per class each.

    Else the export does not fit its model.json. This also imports what decoding needs
    (torchvision: seconds), so that the first request is not the one to wait for it.
    """
    import io

    from PIL import Image

    p = model.preprocess
    png = io.BytesIO()
    Image.new("RGB", (p["size"] * 2 + 1, p["size"] + 3), (90, 120, 200)).save(png, format="PNG")
    decoded = model.decode(png.getvalue())
    if decoded.image is None:
        raise ModelError(f"{model.file}: a test image cannot be decoded as model.json says ({decoded.reason})")
    images = np.stack([decoded.image, np.zeros_like(decoded.image)])
    try:
        probs = model.probabilities(images)
    except Exception as exc:
        first = _first_line(exc)
        raise ModelError(
            f"{model.file} does not take the input its model.json describes "
            f"({p['channels']}x{p['size']}x{p['size']} images): {first}"
        ) from None
    if probs.shape != (2, len(model.classes)) or not np.isfinite(probs).all():
        raise ModelError(
            f"{model.file} gives outputs of shape {list(probs.shape)} for 2 images, but its model.json names "
            f"{len(model.classes)} classes: the file and model.json are from different exports"
        )


def _run_id(file: Path, info: dict) -> str | None:
    """The MLflow run that trained the project's own export, from its note, when the note is about this model."""
    note = file.parent.parent / "train" / RUN_NOTE.name
    try:
        data = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    tag = info.get("mlflow_run_tag") or {}
    return data.get("run_id") if data.get("best_sha256") in tag.values() else None


def _first_line(exc: BaseException, text: str | None = None) -> str:
    """The first line of an exception's message (or of `text`), at most 200 characters: for a one-line error."""
    return (str(exc if text is None else text).strip().splitlines() or [type(exc).__name__])[0][:200]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _download(reference: str, into: Path) -> str:
    """The run's export/model.pt2 and export/model.json into `into`; returns the run id."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ModelError(
            f"cannot look up {reference}: there is no MLflow store at {uri} (set MLFLOW_TRACKING_URI, "
            "or run from the project root)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow
        from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        if reference.startswith("runs:/"):
            run_id = reference.removeprefix("runs:/").split("/")[0]
            client.get_run(run_id)
        else:
            name, _, rest = reference.removeprefix("models:/").partition("@")
            if rest:
                version = client.get_model_version_by_alias(name, rest)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
            run_id = version.run_id
        for name in ("model.json", FILES["torch_export"]):
            local = Path(client.download_artifacts(run_id, f"export/{name}", str(into / "download")))
            local.rename(into / name)
    except Exception as exc:  # MlflowException, or the store's own (a database, a network) errors
        first = _first_line(exc, exc.message if isinstance(exc, MlflowException) else None)
        raise ModelError(f"cannot load {reference} from the MLflow store {uri}: {first}") from None
    return run_id
