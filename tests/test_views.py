"""What a person sees of a run: its name, links, status and results in MLflow, Prefect and the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tasks import STAGES, StepContext, naming, run_stage, tracking
from tasks.errors import PipelineError
from tasks.params import load, write_overrides
from tests.conftest import ROOT, sh


def test_names_say_what_differs_from_the_committed_params(project):
    committed = naming.committed_params()
    params = load(overrides=["train.lr=0.01", "train.epochs=5", "train.num_workers=1", "evaluate.batch_size=64"])
    changed = naming.changes(params, committed)
    assert set(changed) == {"train.lr", "train.epochs", "train.num_workers", "evaluate.batch_size"}
    assert changed["train.lr"] == (0.003, 0.01)
    # num_workers changes no result; batch_size is in two sections, so it keeps its own.
    assert naming.run_name(params, changed) == "cnn-digits epochs=5 lr=0.01 evaluate.batch_size=64"
    assert (
        naming.run_name(params, changed, "brisk-lion")
        == "cnn-digits epochs=5 lr=0.01 evaluate.batch_size=64 [brisk-lion]"
    )
    assert naming.run_name(load(), naming.changes(load(), committed)) == "cnn-digits"
    many = load(
        overrides=[
            *(f"train.{kv}" for kv in ("lr=0.01", "epochs=5", "batch_size=32", "weight_decay=0.01", "accumulate=2")),
            *(f"train.{kv}" for kv in ("label_smoothing=0.1", "clip_grad_norm=1", "optimizer=sgd", "momentum=0.5")),
            "train.augment.rotation=10",
            "train.schedule.name=cosine",
            "seed=1",
        ]
    )
    name = naming.run_name(many, naming.changes(many, committed))
    assert len(name) <= naming.MAX_NAME and name.endswith("more") and name.startswith("cnn-digits ")
    text = naming.describe(params, changed, {"Prefect flow run": "http://127.0.0.1:4200/runs/flow-run/x"})
    assert "`train.lr`: 0.003 → 0.01" in text and "http://127.0.0.1:4200/runs/flow-run/x" in text


def test_git_dirty_is_judged_on_the_values_not_the_yaml_layout(project):
    from tasks.train import run_tags

    def dirty() -> str:
        return run_tags(load(), StepContext())["git.dirty"]

    assert dirty() == "false"
    write_overrides(project / "params.yaml", ["train.lr=0.01"])
    assert dirty() == "true"
    # the params are logged with the run: a reproduction restores them, so they are not "uncommitted"
    assert run_tags(load(), StepContext())["git.uncommitted"] == ""
    write_overrides(project / "params.yaml", ["train.lr=0.003"])  # back to the committed value
    assert dirty() == "false"
    # The same values in another layout (as other tools rewrite it: no comments, other indents).
    tree = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(tree, default_flow_style=True))
    assert sh("git", "status", "--porcelain", cwd=project).stdout.strip() == "M params.yaml"
    assert dirty() == "false"
    # A params file git does not have cannot be compared by value: the run is dirty, and says why.
    other = project / "other.yaml"
    other.write_text((project / "params.yaml").read_text())
    tags = run_tags(load(other), StepContext(params_path=Path("other.yaml")))
    assert tags["git.dirty"] == "true" and "not compared with" in tags["mlflow.note.content"]
    # Any other tracked file that differs from the commit does make the run dirty.
    (project / "tasks/naming.py").write_text((project / "tasks/naming.py").read_text() + "\n# edited\n")
    assert dirty() == "true"
    assert run_tags(load(), StepContext())["git.uncommitted"] == "tasks/naming.py"


def test_telemetry_is_off_in_every_entry_point_without_the_scripts(tmp_path):
    """`source .venv/bin/activate` then `python -m ...`: no env.sh, yet no tool sends usage data."""
    from tasks import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    code = "import {}, os, json; print(json.dumps({{k: os.environ.get(k) for k in {!r}}}))"
    keys = ["DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS"]
    for module in ("tasks", "flows", "tasks.tracking"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(module, keys)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert json.loads(out.stdout) == {
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
        }, module
    assert "analytics = false" in (ROOT / ".dvc/config").read_text()


@pytest.mark.slow
def test_the_run_ends_with_the_last_step_and_a_failed_step_marks_it_failed(trained):
    """FINISHED after the last step that ran, with its end time; FAILED, with the reason, when a step fails."""
    from tasks import paths

    c = tracking.client()
    run_id = tracking.current_run_id(paths.BEST)
    before = c.get_run(run_id).info
    assert before.status == "FINISHED"
    params = load()

    labels = paths.labels("test")
    good = labels.read_bytes()
    labels.write_bytes(good[:100])  # cut short: evaluate fails after it has opened the run
    try:
        with pytest.raises(PipelineError):
            run_stage("evaluate", params, StepContext())
    finally:
        labels.write_bytes(good)
    failed = c.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["pipeline.error"].startswith("evaluate: ")

    run_stage("evaluate", params, StepContext())
    after = c.get_run(run_id)
    assert after.info.status == "FINISHED" and "pipeline.error" not in after.data.tags
    assert after.info.end_time > before.end_time  # the run ends with the step that ran last
    assert after.data.tags["pipeline.stage"] == "evaluate"
    # Per-class numbers are one table, not 20 single-point charts that push the curves down.
    assert not [k for k in after.data.metrics if k.count("/") > 1]
    table = json.loads((paths.PER_CLASS).read_text())["per_class"]
    assert len(table) == 10 and sum(row["support"] for row in table.values()) == 270

    def table_rows() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return len(json.loads(Path(c.download_artifacts(run_id, "per_class.json", tmp)).read_text())["data"])

    assert table_rows() == 10
    run_stage("evaluate", params, StepContext())  # again in the same run (say, an evaluate param changed)
    assert table_rows() == 10  # replaced, not appended to
    assert json.loads(c.get_run(run_id).data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "per_class.json", "type": "table"}
    ]


def prefect_view(flow_run_id) -> tuple[object, dict[str, object], dict[str, object]]:
    """The flow run, its task runs by name and its artifacts by key, read back through Prefect's API."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return flow_run, {t.name: t for t in tasks}, {a.key: a for a in artifacts}


@pytest.mark.slow
def test_two_flow_runs_are_named_alike_in_prefect_and_mlflow_linked_and_report_results(prefect_api, project):
    from flows.pipeline import pipeline

    first = pipeline(overrides=["train.epochs=2"], return_state=True)
    second = pipeline(overrides=["train.epochs=4", "train.lr=0.01"], return_state=True)
    assert first.is_completed() and second.is_completed()

    c = tracking.client()
    experiment = c.get_experiment_by_name("pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the training view
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])  # the runs list's columns
    assert "params.`train.lr`" in view["selectedColumns"] and "metrics.`test/accuracy`" in view["selectedColumns"]
    runs = c.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert len(runs) == 2
    expected_names = ["cnn-digits epochs=2", "cnn-digits epochs=4 lr=0.01"]
    for state, run, name in zip((first, second), runs, expected_names, strict=True):
        flow_run_id = str(state.state_details.flow_run_id)
        flow_run, tasks, artifacts = prefect_view(flow_run_id)
        # One readable name, in both tools.
        assert run.info.run_name == flow_run.name == name
        # Each links to the other.
        tags = run.data.tags
        assert tags["prefect.flow_run_id"] == flow_run_id and tags["prefect.flow_run_name"] == name
        assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
        assert tags["prefect.flow_run_url"] in tags["mlflow.note.content"]
        results = artifacts["pipeline-results"].data
        assert run.info.run_id in results and tracking.run_url(run.info.run_id) in results
        # The commit where MLflow shows a source, and the description says what differs.
        assert tags["mlflow.source.git.commit"] == sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
        assert tags["mlflow.source.name"].endswith("flows/pipeline.py")
        assert "`train.epochs`: 3 → " in tags["mlflow.note.content"]
        # FINISHED when promote, the last step, finished: its end time is within the promote task's run.
        assert run.info.status == "FINISHED" and tags["pipeline.stage"] == "promote"
        last = tasks["promote"]
        assert last.start_time.timestamp() * 1000 <= run.info.end_time <= last.end_time.timestamp() * 1000
        # Every step in the graph; the registry's decision; the per-class table; every param in Prefect.
        assert set(tasks) == set(STAGES)
        assert f"Registry ({tags['promote.decision']}): {tags['promote.reason']}" in results
        table = json.loads(Path(c.download_artifacts(run.info.run_id, "per_class.json", str(project))).read_text())
        assert table["columns"][:3] == ["class", "precision", "recall"] and len(table["data"]) == 10
        params_rows = artifacts["pipeline-params"].data
        assert '"train.epochs"' in params_rows and '"train.checkpoint.keep"' in params_rows
        assert "test metric" in results and "accuracy" in results
    # The second run: prepare and build were up to date, and shown so; the change against the first.
    _, tasks, artifacts = prefect_view(second.state_details.flow_run_id)
    assert tasks["prepare"].state.name == tasks["build"].state.name == "Skipped"
    before = json.loads(artifacts["pipeline-results"].data.split("| accuracy | ")[1].split(" |")[0])
    assert f"| accuracy | {runs[1].data.metrics['test/accuracy']:.4f} |" in artifacts["pipeline-results"].data
    assert before == pytest.approx(runs[1].data.metrics["test/accuracy"], abs=1e-4)
    accuracy_before = f"{runs[0].data.metrics['test/accuracy']:.4f}"
    assert f"| {accuracy_before} |" in artifacts["pipeline-results"].data
