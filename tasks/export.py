"""export: the best model as a state dict, a TorchScript file and a `torch.export` program.

    python -m tasks export           # or: dvc repro export

Each file is loaded back in a fresh Python process that has only torch (`python -I`, run from
the file system root, so the project's model code cannot be imported) and must reproduce the
eager model's outputs on the test split within `export.atol`, or the stage fails and nothing is
logged or replaced. `models/export/model.json` tells a user how to apply the model to raw input
(class names, input shape and dtype, how an image file becomes that input; the normalisation is
inside the model): `python -m serve.predict` and `python -m serve.http` need nothing else.

The files' bytes depend only on the weights and the code: the source paths that TorchScript and
`torch.export` record are made relative to the project or to site-packages, and TorchScript's
constants are emitted in a fixed order. So a fresh clone's first run reproduces `dvc.lock`.

Two MLflow models are logged to the pipeline's run, both loadable without unpickling anything:
`model`, the `torch.export` program in MLflow's `pt2` format (`mlflow.pytorch.load_model`), and
`torchscript`, the TorchScript file behind a pyfunc logged as code (`tasks/mlflow_torchscript.py`,
`mlflow.pyfunc.load_model`). Their files' hashes are run tags, and `tasks.tracking` sets
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`, so a pickle planted in the artifact store is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import site
import subprocess
import sysconfig
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tasks import BY_HAND, StepContext, checker, inputs, paths, tracking
from tasks.errors import ExportError
from tasks.files import json_text, save_torch, sha256_file, staged, write_serialized
from tasks.params import Params
from tasks.paths import EXPORT_INFO as INFO
from tasks.paths import EXPORT_STATE as STATE
from tasks.paths import TORCH_EXPORT as EXPORTED
from tasks.paths import TORCHSCRIPT

CHECK_IMAGES = 512  # test images the exported files must reproduce the eager model on
PYFUNC_CODE = Path(__file__).with_name("mlflow_torchscript.py")

# torch 2.14 deprecates TorchScript in favour of torch.export; users still ask for it, so both are
# made, and the warning on every jit call (MLflow's included) says nothing new.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
# The pyfunc takes an array, as its signature says: MLflow's advice to add type hints is noise.
# (Its message starts with a colour code, hence the leading `.*`.)
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*looks like a TorchScript archive", category=UserWarning)
# "Validating input example against model signature" on every export: progress a user cannot act on.
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)


def _path_prefixes() -> list[str]:
    """Folders whose absolute paths differ between machines and clones: the project and the Pythons'."""
    folders = {str(Path.cwd().resolve()), str(Path(__file__).resolve().parents[1]), site.getusersitepackages()}
    folders.update(site.getsitepackages())
    folders.update(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    # Longest first: site-packages inside the project's .venv must win over the project root.
    prefixes = {p.rstrip(os.sep) + os.sep for p in folders if p and p.rstrip(os.sep)}  # never the root itself
    return sorted(prefixes, key=len, reverse=True)


def portable(text: str, prefixes: list[str]) -> str:
    """`text` with every absolute project or library path made relative (`tasks/build.py`, `torch/nn/...`)."""
    pattern = "|".join(re.escape(p) for p in prefixes)
    return re.sub(pattern, "", text) if pattern else text


_SCRIPTING = threading.Lock()


@contextlib.contextmanager
def reproducible_scripting(prefixes: list[str]) -> Iterator[None]:
    """Make `torch.jit.script` output depend only on the code, not on the folder or the process.

    TorchScript records each function's source file (an absolute path) and collects module
    constants in a set, whose order changes with Python's per-process hash seed; both end up in
    the archive. Here the file names are made relative and the set iterates in sorted order, by
    swapping two module globals of torch's TorchScript frontend for the duration (one thread at a
    time). `absolute_paths` checks the result: code that TorchScript compiled earlier in the same
    process, outside this block, is reused from its cache with its absolute paths.
    """
    import torch._sources as sources
    import torch.jit._recursive as recursive

    class SortedSet(set):
        def __iter__(self):  # type: ignore[override]
            return iter(sorted(set.__iter__(self), key=str))

    with _SCRIPTING:
        real = sources.inspect
        shim = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
        shim.getsourcefile = lambda obj: portable(real.getsourcefile(obj) or "", prefixes) or None
        had_set = "set" in vars(recursive)
        old_set = vars(recursive).get("set")
        sources.inspect, recursive.set = shim, SortedSet
        try:
            yield
        finally:
            sources.inspect = real
            if had_set:
                recursive.set = old_set
            else:
                del recursive.set


def absolute_paths(archive: Path, prefixes: list[str]) -> list[str]:
    """The machine-specific paths left in an archive's code and metadata (tensor data is not searched)."""
    import zipfile

    found = set()
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if "/data/" in name and not name.endswith((".json", ".pkl")):
                continue  # raw tensor bytes: any match there would be chance
            text = z.read(name)
            found.update(p for p in prefixes if p.encode() in text)
    return sorted(found)


def reproducible_program(program: torch.export.ExportedProgram, prefixes: list[str]) -> torch.export.ExportedProgram:
    """Make the stack traces that `torch.export` keeps on each node independent of the folder."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if isinstance(node.meta.get("stack_trace"), str):
                    node.meta["stack_trace"] = portable(node.meta["stack_trace"], prefixes)
    return program


def check_in_fresh_process(x: torch.Tensor, expected: torch.Tensor, ts: Path, pt2: Path) -> dict[str, float]:
    """Largest absolute difference from the eager outputs, per export format (see `tasks/checker.py`)."""
    data = io.BytesIO()
    torch.save({"ts": str(ts.resolve()), "pt2": str(pt2.resolve()), "x": x, "expected": expected}, data)
    try:
        proc = checker.run(data.getvalue(), timeout=600)
    except subprocess.TimeoutExpired:
        raise ExportError("loading the exported model in a fresh process took over 600 s") from None
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"loading the exported model in a fresh process failed: {last}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def log_to_mlflow(
    run_id: str, model: torch.nn.Module, example: torch.Tensor, ts: Path, files: list[Path], hashes: dict, check: str
) -> dict[str, str]:
    """Log the export files, then the `pt2` and TorchScript models; return the models' URIs.

    The models come last, and a model whose logging fails is marked FAILED, so a failed export
    never leaves a READY model behind on the run.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import infer_signature

    tracking.log_artifacts(run_id, "export", files)
    # export.check is what the registry's promotion requires (tasks/promote.py)
    tracking.set_tags(run_id, {"export.check": check, **{f"export.sha256.{k}": v for k, v in hashes.items()}})
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with torch.no_grad():
        output = model(example).numpy()
    signature = infer_signature(example.numpy(), output)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # explicit: inferring them takes seconds
    client = tracking.client()
    uris = {}
    created: list[str] = []
    with tracking.store():
        run = client.get_run(run_id)
        try:
            # Created here, in the run's experiment: left to itself, log_model files a model logged
            # without an active run under the default experiment, where `runs:/<id>/model` misses it.
            for name in ("model", "torchscript"):
                logged = client.create_logged_model(
                    experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
                )
                created.append(logged.model_id)
                if name == "model":
                    info = mlflow.pytorch.log_model(
                        model,
                        name=name,
                        run_id=run_id,
                        model_id=logged.model_id,
                        serialization_format="pt2",  # a torch.export program: no pickled module
                        signature=signature,
                        input_example=example.numpy(),  # a batch of 5 keeps the batch size dynamic
                        pip_requirements=requirements,
                    )
                else:
                    # log_model puts its own "show UserWarnings once" filter ahead of ours: catch them here.
                    with warnings.catch_warnings(record=True) as caught:
                        info = mlflow.pyfunc.log_model(
                            name=name,
                            model_id=logged.model_id,
                            python_model=str(PYFUNC_CODE),  # models-from-code: the code is a file, not a pickle
                            artifacts={"torchscript": str(ts)},
                            model_config={"sha256": hashes["torchscript"]},
                            signature=signature,
                            input_example=example.numpy(),
                            pip_requirements=[*requirements, "numpy"],
                        )
                    for w in caught:
                        if "Add type hints to the `predict` method" not in str(w.message):
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
                uris[name] = info.model_uri
        except BaseException:
            for model_id in created:
                with contextlib.suppress(Exception):
                    client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            raise
    return uris


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    checker.start_ahead()  # the check's fresh process (unless the flow started it): its imports overlap ours
    try:
        model = inputs.model(params, paths.BEST, made_by="train").eval()
        run_id = tracking.current_run_id(paths.BEST)
        with tracking.stage_run(run_id, "export"):  # the pipeline's last step: the run ends with it
            return _export(params, model, run_id)
    finally:
        checker.stop_ahead()  # still waiting: the export failed before its check


def _export(params: Params, model: torch.nn.Module, run_id: str) -> dict:
    manifest = inputs.manifest()
    x = torch.from_numpy(np.array(inputs.dataset("test").images[:CHECK_IMAGES])).float()
    with torch.no_grad():
        expected = model(x)

    prefixes = _path_prefixes()
    with reproducible_scripting(prefixes):
        scripted = torch.jit.script(model)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    program = reproducible_program(program, prefixes)

    # Everything is written beside its final name, checked and logged there; only a model that
    # passes, and whose logging succeeded, replaces the previous export.
    with staged(STATE, TORCHSCRIPT, EXPORTED, INFO) as (state, ts, pt2, info_file):
        # Through memory, so that neither the temporary name nor a full disk reaches torch's writers.
        save_torch(model.state_dict(), state)
        write_serialized(ts, lambda f: torch.jit.save(scripted, f))
        write_serialized(pt2, lambda f: torch.export.save(program, f))
        leaked = {f.name: absolute_paths(f, prefixes) for f in (ts, pt2)}
        if any(leaked.values()):
            raise ExportError(
                f"the exported files record machine-specific paths ({leaked}), so their hashes would differ between "
                "clones; something in this process compiled the model's code before the export did: run the export "
                "in a process of its own (python -m tasks export)"
            )
        diffs = check_in_fresh_process(x, expected, ts, pt2)
        bad = {k: v for k, v in diffs.items() if not v <= params.export.atol}
        if bad:
            raise ExportError(
                f"exported model differs from the eager model by {bad} (export.atol is {params.export.atol})"
            )
        hashes = {"state_dict": sha256_file(state), "torchscript": sha256_file(ts), "torch_export": sha256_file(pt2)}
        info = {
            "classes": manifest["classes"],
            "input": {
                "shape": ["batch", *manifest["input_shape"]],
                "dtype": "float32",
                "range": [0, manifest["max_value"]],
                "layout": "raw pixel values, NCHW; do not normalise: the model's first layer does",
            },
            "normalisation": manifest["normalisation"],
            # How to turn an image file into that input, as prepare did: serve/ applies it.
            "preprocess": {
                **manifest["preprocess"],
                "steps": "decode with Pillow, turn upright by EXIF, convert to channels (1: grey, 3: RGB), resize "
                "to size x size by the resize policy (crop: shorter side, centre cut; pad: longer side, black "
                "borders; stretch), antialiased; then 8-bit values p become round(p * max_value / 255)",
            },
            "output": "logits, one per class; argmax gives the index into classes",
            "files": {
                "state_dict": {"path": STATE.name, "load": "torch.load(path, weights_only=True)"},
                "torchscript": {"path": TORCHSCRIPT.name, "load": "torch.jit.load(path)"},
                "torch_export": {"path": EXPORTED.name, "load": "torch.export.load(path).module()"},
            },
            "sha256": hashes,
            "check": {"atol": params.export.atol, "max_abs_diff": diffs, "images": x.shape[0]},
            # The MLflow run is found by the trained weights' hash, not named here: a run id differs per run.
            "mlflow_run_tag": {tracking.MODEL_TAG: sha256_file(paths.BEST)},
            "torch": torch.__version__,
        }
        info_file.write_text(json_text(info))
        worst = max(diffs.values())
        check = f"passed: max |diff| {worst:.2e} <= export.atol {params.export.atol:g} on {x.shape[0]} images"
        uris = log_to_mlflow(run_id, model, x[:5], ts, [pt2, info_file], hashes, check)
    print(
        f"export: {TORCHSCRIPT}, {EXPORTED}, {STATE}; max |diff| {worst:.2e}; "
        f"MLflow models {uris['model']} (pt2), {uris['torchscript']} (TorchScript pyfunc)"
    )
    return {"torchscript": str(TORCHSCRIPT), "torch_export": str(EXPORTED), "model_uri": uris["model"]}
