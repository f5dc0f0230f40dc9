"""Scheduled retraining: prefect.yaml deployed to a real Prefect server, run by a real worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import dvc, free_port, sh

pytestmark = pytest.mark.slow


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}/{path}", data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_a_deployment_retrains_through_a_worker_one_run_at_a_time(project, tmp_path):
    """deploy.sh and worker.sh as the README runs them; two triggers: the second waits for the first."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_PORT": str(free_port()), "VENV": sys.prefix})
    url = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    worker = None
    try:
        deployed = sh("bash", "scripts/deploy.sh", cwd=project, env=env)
        assert "pipeline/retrain" in deployed.stdout + deployed.stderr
        (deployment,) = api(url, "deployments/filter", {})
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["work_pool_name"] == "pipeline"

        worker = subprocess.Popen(
            ["bash", "scripts/worker.sh"], cwd=project, env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        ids = []
        for epochs in (2, 3):  # 3 is the committed value: that run's name has no param in it
            body = {"parameters": {"overrides": [f"train.epochs={epochs}"], "force": False}}
            ids.append(api(url, f"deployments/{deployment['id']}/create_flow_run", body)["id"])
        deadline = time.monotonic() + 600
        while True:
            runs = {r["id"]: r for r in api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})}
            if all(runs[i]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for i in ids):
                break
            assert time.monotonic() < deadline, f"flow runs not done in 600 s: {[runs[i]['state_name'] for i in ids]}"
            time.sleep(2)
        assert [runs[i]["state_type"] for i in ids] == ["COMPLETED", "COMPLETED"]
        # One at a time: the later run started only after the earlier one ended.
        first, second = sorted((runs[i] for i in ids), key=lambda r: r["start_time"])
        assert first["end_time"] <= second["start_time"]
        assert sorted(r["name"] for r in runs.values()) == ["cnn-digits", "cnn-digits epochs=2"]
        for run_id in ids:
            artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
            assert {"pipeline-params", "pipeline-results"} <= {a["key"] for a in artifacts}
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGINT)
            worker.communicate(timeout=60)
        sh(sys.executable, "-m", "flows.server", "--stop", cwd=project, env=env, check=False)

    # dvc.lock is true to the last run, and MLflow has one FINISHED run per flow run, named like it.
    assert "up to date" in dvc("status", cwd=project).stdout
    last = second["parameters"]["overrides"][0].split("=")[1]  # params.yaml says what the last run used
    assert f"epochs: {last}" in (project / "params.yaml").read_text()
    from tasks.tracking import client

    c = client()
    finished = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.info.run_name for r in finished) == ["cnn-digits", "cnn-digits epochs=2"]
    assert {r.data.tags["prefect.flow_run_id"] for r in finished} == set(ids)
    assert Path(project / "metrics/evaluate.json").exists()
