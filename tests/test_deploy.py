"""Scheduled retraining: prefect.yaml deployed to a real Prefect server, run by a real worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import create_database, dvc, free_port, query, sh
from tests.conftest import prefect_rest as api

pytestmark = pytest.mark.slow


def trigger(url: str, deployment: dict, overrides: list[str]) -> str:
    """A flow run of the deployment, as the UI's "Run" or `prefect deployment run` creates one; its id."""
    body = {"parameters": {"overrides": overrides, "force": False}}
    return api(url, f"deployments/{deployment['id']}/create_flow_run", body)["id"]


def wait_for_runs(url: str, ids: list[str], timeout: float = 600) -> dict[str, dict]:
    """The flow runs, once every one has ended."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {r["id"]: r for r in api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})}
        if all(runs[i]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for i in ids):
            return runs
        assert time.monotonic() < deadline, f"flow runs not done in {timeout} s: {[runs[i]['state_name'] for i in ids]}"
        time.sleep(2)


def outputs(project: Path) -> dict[str, bytes]:
    """Every file the pipeline writes or records (the checkpoints too), and params.yaml, by content."""
    found = {}
    for folder in ("data/prepared", "models", "metrics", "plots"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(project))] = path.read_bytes()
    for name in ("dvc.lock", "params.yaml"):
        found[name] = (project / name).read_bytes()
    return found


@contextmanager
def deployed(project: Path, home: Path, workers: int = 1, env: dict | None = None) -> Iterator[tuple[str, dict]]:
    """deploy.sh and `workers` worker.sh as the README runs them, on a free port; yields (API URL, deployment)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **(env or {})}
    env.update({"PREFECT_HOME": str(home), "PREFECT_PORT": str(free_port()), "VENV": sys.prefix})
    # Shorter waits than a real deployment's, the same behaviour: workers ask for work every second
    # (not 10), and a run that finds the deployment's one slot taken asks again after 2 s (not 30).
    env.update({"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"})
    url = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    started = []
    try:
        done = sh("bash", "scripts/deploy.sh", cwd=project, env=env)
        assert "pipeline/retrain" in done.stdout + done.stderr
        (deployment,) = [d for d in api(url, "deployments/filter", {}) if d["name"] == "retrain"]
        for n in range(workers):
            started.append(
                subprocess.Popen(
                    ["bash", "scripts/worker.sh", "--name", f"worker-{n + 1}"],
                    cwd=project,
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
        yield url, deployment
    finally:
        # Ctrl-C, as a user stops a worker; a second one if a worker is still there after 10 s: a
        # Prefect worker sometimes stays up, idle, after the first (seen in whole-suite runs, where
        # waiting for it cost 60 s per worker); the second stopped it at once.
        for signum in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
            for worker in started:
                if worker.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(worker.pid, signum)
            deadline = time.monotonic() + 10
            for worker in started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=max(deadline - time.monotonic(), 0.1))
        sh(sys.executable, "-m", "flows.server", "--stop", cwd=project, env=env, check=False)


def two_runs_one_at_a_time(url: str, deployment: dict) -> list[dict]:
    """Two triggers at once, with different params: both complete, the second starts after the first ends."""
    ids = [trigger(url, deployment, [f"train.epochs={epochs}"]) for epochs in (2, 3)]
    runs = wait_for_runs(url, ids)
    assert [runs[i]["state_type"] for i in ids] == ["COMPLETED", "COMPLETED"]
    first, second = sorted((runs[i] for i in ids), key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"]
    # 3 is the committed value: that run's name has no param in it.
    assert sorted(r["name"] for r in runs.values()) == ["cnn-digits", "cnn-digits epochs=2"]
    for run_id in ids:
        artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        assert {"pipeline-params", "pipeline-results"} <= {a["key"] for a in artifacts}
    return [first, second]


def trained_as_the_runs_say(project: Path, runs: list[dict]) -> None:
    """dvc.lock is true to the last run, and MLflow has one FINISHED run per flow run, named like it."""
    from tasks.tracking import client

    assert "up to date" in dvc("status", cwd=project).stdout
    last = runs[-1]["parameters"]["overrides"][0].split("=")[1]  # params.yaml says what the last run used
    assert f"epochs: {last}" in (project / "params.yaml").read_text()
    c = client()
    finished = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.info.run_name for r in finished) == ["cnn-digits", "cnn-digits epochs=2"]
    assert {r.data.tags["prefect.flow_run_id"] for r in finished} == {r["id"] for r in runs}
    assert Path(project / "metrics/evaluate.json").exists()


def test_a_deployment_retrains_through_a_worker_one_run_at_a_time(project, tmp_path):
    """The schedule and limit as deployed; two triggers, the second waiting; a failing run changes nothing."""
    with deployed(project, tmp_path / "prefect") as (url, deployment):
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["work_pool_name"] == "pipeline"
        assert deployment["parameters"] == {"overrides": [], "force": False, "pull": True}
        runs = two_runs_one_at_a_time(url, deployment)

        # A retrain whose training diverges: Failed, naming train and why; every output as it was, and
        # params.yaml without the override that failed.
        before = outputs(project)
        failed_id = trigger(url, deployment, ["train.lr=10"])
        failed = wait_for_runs(url, [failed_id])[failed_id]
        assert failed["state_type"] == "FAILED"
        assert "train: training diverged at epoch 1" in failed["state"]["message"]
        tasks = api(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [failed_id]}}})
        assert {t["name"]: t["state_type"] for t in tasks} == {
            "prepare": "COMPLETED", "build": "COMPLETED", "train": "FAILED"
        }  # fmt: skip
        assert outputs(project) == before

        # The scoring deployment, its nightly schedule off until switched on, run by the same worker
        # on the model the retrains exported.
        (scoring,) = [d for d in api(url, "deployments/filter", {}) if d["name"] == "score"]
        assert [(s["schedule"]["cron"], s["active"]) for s in scoring["schedules"]] == [("0 4 * * *", False)]
        incoming = project / "data/incoming"
        incoming.mkdir()
        for n, value in enumerate((0, 128, 255)):
            Image.new("L", (20, 20), value).save(incoming / f"{n}.png")
        (incoming / "notes.txt").write_text("not an image")
        run_id = api(url, f"deployments/{scoring['id']}/create_flow_run", {})["id"]
        assert wait_for_runs(url, [run_id])[run_id]["state_type"] == "COMPLETED"
        scored = (project / "predictions/incoming.csv").read_text().splitlines()
        assert scored[0] == "file,class,probability,error" and len(scored) == 5
        assert scored[-1].endswith(",,,not an image (Pillow cannot identify it)")
    trained_as_the_runs_say(project, runs)


def test_the_same_deployment_on_a_postgresql_server_with_two_workers(project, tmp_path, postgres):
    """A team's server: Prefect on PostgreSQL, two workers polling the one pool, the limit of one still held."""
    database = create_database(postgres, "prefect")
    env = {"PREFECT_API_DATABASE_CONNECTION_URL": database}
    with deployed(project, tmp_path / "prefect", workers=2, env=env) as (url, deployment):
        deadline = time.monotonic() + 60
        while len(online := api(url, "work_pools/pipeline/workers/filter", {})) < 2:
            assert time.monotonic() < deadline, f"workers online after 60 s: {online}"
            time.sleep(1)
        assert sorted(w["name"] for w in online) == ["worker-1", "worker-2"]
        runs = two_runs_one_at_a_time(url, deployment)
    # The server kept them in PostgreSQL (beside the runs it scheduled for the nights to come).
    stored = query(database, "SELECT name, state_type FROM flow_run WHERE start_time IS NOT NULL ORDER BY start_time")
    assert stored == [(r["name"], "COMPLETED") for r in runs]
    trained_as_the_runs_say(project, runs)
