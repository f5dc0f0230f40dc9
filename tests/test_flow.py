"""The real Prefect flow against a real (test harness) Prefect server, in a DVC repository."""

from __future__ import annotations

import os
import sys

import pytest

from tasks import STAGES
from tasks.params import ConfigError
from tests.conftest import dvc, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect server for the whole session (each start costs 10-20 s on 2 cores)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def task_runs(flow_run_id) -> list[str]:
    """Names of the flow run's task runs, in the order they started, read back from the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.name for r in sorted(runs, key=lambda r: r.start_time)]


def test_flow_runs_stale_stages_in_dvc_order_and_commits_them(prefect_api, project):
    from flows.pipeline import pipeline
    from tasks.tracking import client

    state = pipeline(return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    assert task_runs(flow_run_id) == list(STAGES)

    # The flow committed what it ran: DVC finds nothing to do.
    assert "up to date" in dvc("status", cwd=project).stdout
    assert "Running stage" not in dvc("repro", cwd=project).stdout

    # Nothing changed, so a second flow run runs no task.
    again = pipeline(return_state=True)
    assert again.is_completed() and task_runs(again.state_details.flow_run_id) == []
    assert set(again.result().values()) == {"up to date"}

    # Inside a DVC repository the params are params.yaml, which dvc.lock records.
    (project / "other.yaml").write_text((project / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="in a DVC repository the params are params.yaml"):
        pipeline(params_path="other.yaml")

    c = client()
    runs = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["orchestrator"] == "prefect"
    assert runs[0].data.tags["prefect.flow_run_id"] == str(flow_run_id)


def test_cli_override_reruns_from_train_and_writes_params(prefect_api, project):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = sh(sys.executable, "-m", "flows.pipeline", cwd=project, env=env)
    assert "test accuracy" in first.stdout and "MLflow run" in first.stdout

    proc = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.epochs=4", cwd=project, env=env)
    out = proc.stdout + proc.stderr  # the steps' prints go through Prefect's logger, to stderr
    for stage in ("prepare", "build"):
        assert f"{stage}: up to date" in out
    assert "epoch   4/4" in out
    assert "epochs: 4" in (project / "params.yaml").read_text()
    assert "up to date" in dvc("status", cwd=project).stdout

    bad = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.lr=0", cwd=project, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: params.yaml: train.lr: got 0; input should be greater than 0"
    assert "lr: 0.003" in (project / "params.yaml").read_text()
