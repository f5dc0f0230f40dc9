"""The pipeline's steps, one module each: `run(params, ctx)` reads files, calls the core, writes files.

`STAGES` is the one list of step names and their order. `dvc.yaml`, the Prefect flow
(`flows/pipeline.py`), the `params.yaml` sections and the modules here all use these names,
and `tests/test_stages.py` fails if any of them drifts. Every step has the same signature, so the
stage runner (`python -m tasks STAGE`) and the flow call them all the same way.

Layers run one way: flows -> steps (`tasks/<stage>.py`: files, MLflow) -> the torch-only core
(`tasks/core/`) -> libraries. A step never imports another step: shared paths live in
`tasks/paths.py`, shared code in the core or in `tasks/files.py` and `tasks/tracking.py`.
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.params import Params

STAGES = ("prepare", "build", "train", "evaluate", "export", "promote")

# Offline by default, in every entry point (`python -m tasks`, the flows, `dvc repro`'s stages,
# the tests), not only behind scripts/env.sh: no usage data from Prefect, MLflow or DVC, and no
# notice about it. A user who wants telemetry sets these variables.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)

# Full garbage collections rarely, in every process of the project (the first import of every entry
# point, stage and trial is this package): importing torch, MLflow and torchmetrics builds about a
# million objects, and with Python's default thresholds (700, 10, 10) the collector walks them all
# again each time they grow by a quarter: 0.65-0.7 s of a stage's 5.4 s of imports (measured, 4 runs
# each). Young objects are still collected as often as before, and the old generation after 1000
# collections of the middle one instead of 10, so a cycle of garbage is freed later, not never.
_young, _middle, _old = gc.get_threshold()
gc.set_threshold(_young, _middle, max(_old, 1000))


@dataclass(frozen=True)
class StepContext:
    """What a step may need besides params: where they came from, and tags for the MLflow run."""

    params_path: Path = Path("params.yaml")
    tags: Mapping[str, str] = field(default_factory=dict)


BY_HAND = StepContext()  # a step called from Python: params.yaml, no extra tags


def run_stage(stage: str, params: Params, ctx: StepContext) -> dict:
    """Run one step in this process."""
    return importlib.import_module(f"tasks.{stage}").run(params, ctx)
