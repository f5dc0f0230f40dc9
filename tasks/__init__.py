"""The pipeline's steps, one module each: plain functions that read and write files.

`STAGES` is the one list of step names and their order. `dvc.yaml`, the Prefect flow
(`flows/pipeline.py`), the `params.yaml` sections and the modules here all use these names,
and `tests/test_stages.py` fails if any of them drifts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.params import Params

STAGES = ("prepare", "build", "train", "evaluate", "export")


def run_stage(stage: str, params: Params, params_path: Path, tags: dict[str, str] | None = None) -> dict:
    """Run one step in this process; `train` also opens the MLflow run, so it gets the tags."""
    module = importlib.import_module(f"tasks.{stage}")
    if stage == "train":
        return module.run(params, tags=tags, params_path=params_path)
    return module.run(params)
