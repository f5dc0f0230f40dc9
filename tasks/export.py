"""export: the best model as a state dict, a TorchScript file and a `torch.export` program.

    python -m tasks export           # or: dvc repro export

Each file is loaded back in a fresh Python process that has only torch (`python -I`, run from an
empty folder, so the project's model code cannot be imported) and must reproduce the eager
model's outputs on the test split within `export.atol`, or the stage fails and nothing is
logged. `models/export/model.json` tells a user how to apply the model to raw input (class names,
input shape and dtype; the normalisation is inside the model). The TorchScript model is logged to
the pipeline's MLflow run as an MLflow model with a signature and an input example.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from tasks import tracking
from tasks.files import atomic_path, read_json, sha256_file, write_json
from tasks.params import Params
from tasks.prepare import MANIFEST, load_split

OUT_DIR = Path("models/export")
STATE = OUT_DIR / "model_state.pt"
TORCHSCRIPT = OUT_DIR / "model.ts"
EXPORTED = OUT_DIR / "model.pt2"
INFO = OUT_DIR / "model.json"

# Runs in the fresh process: torch only, no project code.
CHECK = """
import json, sys, warnings
import torch
warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript deprecation
x, expected = torch.load(sys.argv[1], weights_only=True).values()
models = {"torchscript": torch.jit.load(sys.argv[2]), "torch_export": torch.export.load(sys.argv[3]).module()}
out = {}
with torch.no_grad():
    for name, model in models.items():
        out[name] = (model(x) - expected).abs().max().item()
print(json.dumps(out))
"""


# torch 2.14 deprecates TorchScript in favour of torch.export; users still ask for it, so both are
# made, and the warning on every jit call (MLflow's included) says nothing new.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*looks like a TorchScript archive", category=UserWarning)


class ExportError(Exception):
    """An exported file does not reproduce the eager model."""


def check_in_fresh_process(x: torch.Tensor, expected: torch.Tensor, ts: Path, pt2: Path) -> dict[str, float]:
    """Largest absolute difference from the eager outputs, per export format."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "inputs.pt"
        torch.save({"x": x, "expected": expected}, data)
        proc = subprocess.run(
            [sys.executable, "-I", "-c", CHECK, str(data), str(ts.resolve()), str(pt2.resolve())],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise ExportError(f"loading the exported model in a fresh process failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def log_to_mlflow(run_id: str, scripted: torch.jit.ScriptModule, example: torch.Tensor, files: list[Path]) -> str:
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking.tracking_uri())
    with torch.no_grad():
        output = scripted(example).numpy()
    # Created here, in the run's experiment: left to itself, log_model files a model logged
    # without an active run under the default experiment, where `runs:/<id>/model` misses it.
    client = tracking.client()
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name="model", source_run_id=run_id, params=run.data.params
    )
    info = mlflow.pytorch.log_model(
        scripted,
        name="model",
        run_id=run_id,
        model_id=logged.model_id,
        # The default "pt2" format refuses a ScriptModule (MLflow 3.14+).
        serialization_format="pickle",
        signature=infer_signature(example.numpy(), output),
        input_example=example.numpy(),
        # Explicit, so MLflow does not spend seconds inferring them.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    tracking.log_artifacts(run_id, "export", files)
    return info.model_uri


def run(params: Params) -> dict:
    from tasks.build import load_model
    from tasks.train import BEST

    manifest = read_json(MANIFEST, made_by="prepare")
    run_id = tracking.current_run_id()
    model = load_model(params, BEST).eval()
    x = load_split("test")[0].float()
    with torch.no_grad():
        expected = model(x)

    scripted = torch.jit.script(model)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))

    # Everything is written beside its final name and checked there; only a model that passes
    # replaces the previous export, so a failed check leaves the old files as they were.
    with atomic_path(STATE) as state, atomic_path(TORCHSCRIPT) as ts, atomic_path(EXPORTED) as pt2:
        # Open files, not paths, so that the temporary name does not end up inside the archive.
        with open(state, "wb") as f:
            torch.save(model.state_dict(), f)
        with open(ts, "wb") as f:
            torch.jit.save(scripted, f)
        with open(pt2, "wb") as f:
            torch.export.save(program, f)
        diffs = check_in_fresh_process(x, expected, ts, pt2)
        bad = {k: v for k, v in diffs.items() if not v <= params.export.atol}
        if bad:
            raise ExportError(
                f"exported model differs from the eager model by {bad} (export.atol is {params.export.atol})"
            )

    info = {
        "classes": manifest["classes"],
        "input": {
            "shape": ["batch", *manifest["input_shape"]],
            "dtype": "float32",
            "range": [0, manifest["max_value"]],
            "layout": "raw pixel values, NCHW; do not normalise: the model's first layer does",
        },
        "normalisation": manifest["normalisation"],
        "output": "logits, one per class; argmax gives the index into classes",
        "files": {
            "state_dict": {
                "path": STATE.name,
                "load": "torch.load(path, weights_only=True)",
                "sha256": sha256_file(STATE),
            },
            "torchscript": {
                "path": TORCHSCRIPT.name,
                "load": "torch.jit.load(path)",
                "sha256": sha256_file(TORCHSCRIPT),
            },
            "torch_export": {
                "path": EXPORTED.name,
                "load": "torch.export.load(path).module()",
                "sha256": sha256_file(EXPORTED),
            },
        },
        "check": {"atol": params.export.atol, "max_abs_diff": diffs, "images": x.shape[0]},
        "mlflow_run_id": run_id,
        "torch": torch.__version__,
    }
    write_json(INFO, info)
    uri = log_to_mlflow(run_id, scripted, x[:5], [EXPORTED, INFO])
    print(f"export: {TORCHSCRIPT}, {EXPORTED}, {STATE}; max |diff| {max(diffs.values()):.2e}; MLflow model {uri}")
    return {"torchscript": str(TORCHSCRIPT), "torch_export": str(EXPORTED), "model_uri": uri}
