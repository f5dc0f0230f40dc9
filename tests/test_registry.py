"""The model registry: every export a version with the alias challenger; champion only for a better model.

The gate's rules are checked one by one on `_judge` (no store needed); the real thing runs the
steps in a trained copy of the project against its MLflow store: a worse model, a better one, a
model evaluated on other test data, and what `models:/classifier@champion` then loads.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks import STAGES, StepContext, run_stage
from tasks.params import Promote, load
from tasks.promote import _judge
from tests.conftest import set_param, sh

DATA = ["a" * 32, "b" * 32]  # the test images' and labels' md5
CLEAN = {"git.dirty": "false", "export.check": "passed: max |diff| 0.00e+00"}


def judge(value, champion_value=0.95, tags=None, data=DATA, champion_data=DATA, **cfg):
    champion = None
    if champion_value is not None or champion_data is not None:
        champion = SimpleNamespace(tags={"data.test_md5": " ".join(champion_data or [])})
    decision = {
        "version": "2",
        "challenger_value": value,
        "champion_version": "1" if champion else None,
        "champion_value": champion_value,
    }
    tags = {k: v for k, v in {**CLEAN, **(tags or {})}.items() if v is not None}  # None: no such tag
    return _judge(Promote(**cfg), tags, "classifier version 2", decision, data, champion)


def test_the_first_model_is_champion():
    outcome, message = judge(0.5, champion_value=None, champion_data=None)
    assert outcome == "promoted" and "the first" in message


@pytest.mark.parametrize(
    ("value", "margin", "outcome"),
    [(0.96, 0, "promoted"), (0.95, 0, "kept"), (0.94, 0, "kept"), (0.955, 0.01, "kept"), (0.96, 0.01, "promoted")],
)
def test_champion_moves_only_to_a_model_better_by_the_margin(value, margin, outcome):
    got, message = judge(value, margin=margin)
    assert got == outcome, message
    assert f"{value:.4f} against 0.9500 of version 1" in message


def test_a_gain_equal_to_the_margin_is_enough_despite_float_rounding():
    assert 0.57 - 0.56 < 0.01  # in floats
    assert judge(0.57, champion_value=0.56, margin=0.01)[0] == "promoted"


def test_a_lower_loss_is_better():
    assert judge(0.2, champion_value=0.3, metric="test/loss")[0] == "promoted"
    assert judge(0.4, champion_value=0.3, metric="test/loss")[0] == "kept"


def test_other_test_data_is_refused_even_for_a_better_model():
    outcome, message = judge(0.99, data=["c" * 32, "b" * 32])
    assert outcome == "refused" and "test data" in message and "promote.registered_model" in message


def test_a_failed_or_missing_export_check_is_refused():
    assert judge(0.99, tags={"export.check": "failed"})[0] == "refused"
    assert judge(0.99, tags={"export.check": None})[0] == "refused"


def test_uncommitted_work_stays_challenger_unless_allowed():
    outcome, message = judge(0.99, tags={"git.dirty": "true"})
    assert outcome == "refused" and "promote.from_dirty" in message
    assert judge(0.99, tags={"git.dirty": "unknown"})[0] == "refused"
    assert judge(0.99, tags={"git.dirty": "true"}, from_dirty=True)[0] == "promoted"


def commit_and_run(path, edits: dict[str, str], stages=STAGES[2:]) -> dict:
    """Edit params.yaml, commit (so the run is clean), run the steps; return promote's decision."""
    for old, new in edits.items():
        set_param(path, old, new)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qam", "params", cwd=path)
    params = load()
    result = {}
    for stage in stages:
        result = run_stage(stage, params, StepContext(tags={"orchestrator": "cli"}))
    return result


def champion_accuracy() -> float:
    """`models:/classifier@champion` loaded as MLflow gives it, scored on the test split."""
    import mlflow

    from tasks.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pytorch.load_model("models:/classifier@champion")
    x = torch.from_numpy(np.load("data/prepared/test-images.npy")).float()
    y = torch.from_numpy(np.load("data/prepared/test-labels.npy"))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_only_a_better_model_on_the_same_test_data_becomes_champion(trained):
    from tasks.tracking import client

    c = client()
    first = c.get_model_version_by_alias("classifier", "champion")
    assert first.version == 1 and c.get_model_version_by_alias("classifier", "challenger").version == 1
    start = c.get_run(first.run_id).data.metrics["test/accuracy"]
    assert champion_accuracy() == pytest.approx(start)

    worse = commit_and_run(trained, {"epochs: 3": "epochs: 1", "lr: 0.003": "lr: 0.0003"})
    assert worse["decision"] == "kept" and worse["version"] == "2"
    assert worse["challenger_value"] < worse["champion_value"] == start
    assert c.get_model_version_by_alias("classifier", "champion").version == 1
    assert c.get_model_version_by_alias("classifier", "challenger").version == 2
    again = run_stage("promote", load(), StepContext(tags={"orchestrator": "cli"}))  # by hand: no new version
    assert again["version"] == "2" and len(c.search_model_versions("name = 'classifier'")) == 2
    run = c.get_run(c.get_model_version("classifier", "2").run_id)
    assert run.data.tags["promote.decision"] == "kept" and run.data.tags["promote.champion_value"] == repr(start)

    better = commit_and_run(trained, {"epochs: 1": "epochs: 8", "lr: 0.0003": "lr: 0.003"})
    assert better["decision"] == "promoted" and better["challenger_value"] > start
    champion = c.get_model_version_by_alias("classifier", "champion")
    assert champion.version == 3
    assert champion_accuracy() == pytest.approx(better["challenger_value"])  # the loaded model is version 3

    other_data = commit_and_run(trained, {"test_fraction: 0.15": "test_fraction: 0.2"}, stages=STAGES)
    assert other_data["decision"] == "refused" and "test data" in other_data["reason"]
    assert c.get_model_version_by_alias("classifier", "champion").version == 3
    assert c.get_model_version_by_alias("classifier", "challenger").version == 4
    tags = c.get_model_version("classifier", "4").tags
    assert (
        tags["promote.decision"].startswith("refused")
        and tags["data.test_md5"] != c.get_model_version("classifier", "3").tags["data.test_md5"]
    )
