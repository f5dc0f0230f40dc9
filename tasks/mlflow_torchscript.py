"""The TorchScript export as an MLflow pyfunc model, logged as code: no pickled Python object.

`tasks/export.py` logs this file with `mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"torchscript": "model.ts"}, model_config={"sha256": ...})`. Loading it
(`mlflow.pyfunc.load_model("runs:/<run id>/torchscript")`) runs this file, which checks the
TorchScript file against the sha256 recorded when it was logged and loads it with
`torch.jit.load`, whose format holds no pickled code. Input: float32 raw pixels (N, C, H, W);
output: one logit per class.

Standalone on purpose: torch, numpy and MLflow only, never the project's code.
"""

from __future__ import annotations

import hashlib
import warnings

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
# The pyfunc takes an array, as its signature says: MLflow's advice to add type hints is noise.
# (Its message starts with a colour code, hence the leading `.*`.)
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class TorchScriptModel(PythonModel):
    def load_context(self, context) -> None:
        path = context.artifacts["torchscript"]
        expected = (context.model_config or {}).get("sha256")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if expected and digest.hexdigest() != expected:
            raise ValueError(f"{path} is not the file that was logged (sha256 differs): refusing to load it")
        self.model = torch.jit.load(path, map_location="cpu").eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(TorchScriptModel())
