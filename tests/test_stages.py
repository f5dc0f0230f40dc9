"""One name per step: dvc.yaml, the Prefect flow, params.yaml and tasks/ cannot drift apart."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from tasks import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_stages_and_flow_tasks_are_the_same_list():
    from flows.pipeline import STEP_TASKS

    dvc_stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    flow_tasks = [t.name for t in STEP_TASKS.values()]
    assert dvc_stages == flow_tasks == list(STAGES)


def test_each_stage_calls_its_own_module_and_params_section():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert [k for k in params if k != "seed"] == list(STAGES)
    for stage in STAGES:
        assert dvc_yaml[stage]["cmd"] == f"python -m tasks {stage}"
        assert f"tasks/{stage}.py" in dvc_yaml[stage]["deps"]
        assert callable(importlib.import_module(f"tasks.{stage}").run)
