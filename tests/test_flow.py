"""The real Prefect flow against a real (test harness) Prefect server, in a DVC repository."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest

from flows.server import healthy
from tasks import STAGES
from tasks.params import ConfigError
from tests.conftest import dvc, free_port, one_line_error, prefect_rest, sh, start, wait_for

pytestmark = pytest.mark.slow


def read_task_runs(flow_run_id) -> list:
    """The flow run's task runs, in the order they started, read back from the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def task_runs(flow_run_id) -> list[str]:
    return [r.name for r in read_task_runs(flow_run_id)]


def task_states(flow_run_id) -> list[str]:
    return [r.state.name for r in read_task_runs(flow_run_id)]


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

    # Nothing changed, so a second flow run runs no step: each is in its graph, Skipped.
    again = pipeline(return_state=True)
    assert again.is_completed() and task_runs(again.state_details.flow_run_id) == list(STAGES)
    assert set(task_states(again.state_details.flow_run_id)) == {"Skipped"}
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


def test_a_fresh_clone_s_first_flow_run_evaluates_and_registers_in_its_own_store(prefect_api, project, tmp_path):
    """In a clone, DVC finds evaluate (its outputs are in git) and promote (no outputs) up to date; the flow
    still runs them, since the clone's MLflow run has neither test metrics nor a registry decision."""
    from flows.pipeline import pipeline

    assert pipeline(return_state=True).is_completed()
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "results", cwd=project)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", project, clone, cwd=tmp_path)
    store = f"sqlite:///{tmp_path / 'clone.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": store}
    proc = sh(sys.executable, "-m", "flows.pipeline", cwd=clone, env=env)
    out = proc.stdout + proc.stderr
    for stage, key in (("evaluate", "test/accuracy"), ("promote", "promote.decision")):
        assert re.search(rf"{stage}\] DVC finds it up to date, but MLflow run \w+ has no {key}: running it", out), out
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""  # the same bytes again

    from mlflow import MlflowClient

    c = MlflowClient(store)
    (run,) = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id])
    assert "test/accuracy" in run.data.metrics and run.data.tags["promote.decision"] == "promoted"
    assert c.get_model_version_by_alias("classifier", "champion").run_id == run.info.run_id
    again = sh(sys.executable, "-m", "flows.pipeline", cwd=clone, env=env)
    assert "running it" not in again.stdout + again.stderr  # recorded now: up to date


def last_flow_run_events(api: str) -> set[str]:
    """The end and heartbeat events of the server's latest flow run, once its end (the last event) has arrived."""
    (run,) = prefect_rest(api, "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    body = {
        "filter": {
            "any_resource": {"id": [f"prefect.flow-run.{run['id']}"]},
            "event": {"name": ["prefect.flow-run.Completed", "prefect.flow-run.heartbeat"]},
            "occurred": {"since": run["created"]},
        },
        "limit": 50,
    }
    deadline = time.monotonic() + 60
    while True:
        events = {e["event"] for e in prefect_rest(api, "events/filter", body)["events"]}
        if "prefect.flow-run.Completed" in events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_cli_override_reruns_from_train_and_writes_params(prefect_api, project):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = sh(sys.executable, "-m", "flows.pipeline", cwd=project, env=env)
    assert "test accuracy" in first.stdout and "MLflow run" in first.stdout
    # A command-line run sends no heartbeats (their thread held up the end of every run by up to
    # 1 s), unless they are configured: then it does.
    events = last_flow_run_events(prefect_api)
    assert "prefect.flow-run.Completed" in events and "prefect.flow-run.heartbeat" not in events

    beats = {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    proc = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.epochs=4", cwd=project, env=beats)
    assert {"prefect.flow-run.Completed", "prefect.flow-run.heartbeat"} <= last_flow_run_events(prefect_api)
    out = proc.stdout + proc.stderr  # the steps' prints go through Prefect's logger, to stderr
    for i, stage in enumerate(("prepare", "build"), 1):
        assert f"[{i}/6 {stage}] up to date" in out
    assert "[3/6 train] epoch   4/4" in out
    # No noise: Prefect's long prefix and per-task end lines, MLflow's progress notes.
    for noise in ("| INFO ", "Task run '", "Finished in state Completed", "Validating input example", "warning"):
        assert noise not in out
    assert "epochs: 4" in (project / "params.yaml").read_text()
    assert "up to date" in dvc("status", cwd=project).stdout

    bad = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.lr=0", cwd=project, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: params.yaml: train.lr: got 0; input should be greater than 0"
    assert "lr: 0.003" in (project / "params.yaml").read_text()

    # A run that fails before any step completed takes its overrides back: the params file stays true
    # to the outputs, and the next run (a scheduled one) trains on the params that worked.
    failed = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.lr=10", cwd=project, env=env, check=False)
    assert failed.returncode == 5
    assert failed.stderr.strip().splitlines()[-1].startswith("error: train: training diverged at epoch 1: ")
    assert "params.yaml: the overrides train.lr=10 were taken back: the run failed before any step completed" in (
        failed.stderr
    )
    assert "lr: 0.003" in (project / "params.yaml").read_text()
    assert "up to date" in dvc("status", cwd=project).stdout
    # Once a step completed (build, with the new channels, is in dvc.lock), the overrides stay.
    both = ["--set", "build.channels=[4,8]", "--set", "train.lr=10"]
    failed = sh(sys.executable, "-m", "flows.pipeline", *both, cwd=project, env=env, check=False)
    assert failed.returncode == 5 and "taken back" not in failed.stderr
    assert "lr: 10" in (project / "params.yaml").read_text()


def flow_run_states(port: str) -> list[str]:
    """The state of each flow run on the local server, oldest first, read through its REST API."""
    runs = prefect_rest(f"http://127.0.0.1:{port}/api", "flow_runs/filter", {"sort": "START_TIME_ASC"})
    return [run["state_type"] for run in runs]


def mlflow_runs(status: str | None = None) -> list:
    from tasks.tracking import client

    c = client()
    found = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id], order_by=["attributes.start_time"])
    return [r for r in found if status is None or r.info.status == status]


def test_the_flow_holds_the_checkout_and_ctrl_c_stops_it_cleanly(prefect_api, project):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    flow = start("-m", "flows.pipeline", "--set", "train.epochs=500", cwd=project, env=env)
    wait_for(flow, "epoch   2/500")

    # While the flow trains, neither `dvc repro` nor a stage by hand may touch the same files.
    repro = dvc("repro", cwd=project, check=False)
    assert repro.returncode != 0 and "Unable to acquire lock" in repro.stderr
    by_hand = sh(sys.executable, "-m", "tasks", "train", cwd=project, check=False)
    assert by_hand.returncode == 8 and "another process is working in this checkout" in one_line_error(by_hand)

    flow.send_signal(signal.SIGINT)
    out, _ = flow.communicate(timeout=120)
    assert flow.returncode == 130
    (run,) = mlflow_runs()
    assert run.info.status == "KILLED"
    assert out.strip().splitlines()[-1] == (
        f"error: interrupted (Ctrl-C): the running step left its previous outputs as they were; "
        f"MLflow run {run.info.run_id} marked KILLED"
    )
    assert "Traceback" not in out
    assert not (project / "models/train/best.pt").exists()  # train never finished: no half a model


def test_the_flow_is_refused_with_one_line_when_dvc_holds_the_checkout(prefect_api, project):
    from dvc.repo import Repo

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    repo = Repo(str(project))
    with repo.lock:
        proc = sh(sys.executable, "-m", "flows.pipeline", cwd=project, env=env, check=False)
    repo.close()
    assert proc.returncode == 8
    assert one_line_error(proc) == (
        "error: another process is working in this checkout (a `dvc repro`, a pipeline flow or a stage holds "
        "DVC's lock, .dvc/tmp/lock); wait for it to finish, then run again"
    )
    assert not (project / "data/prepared/manifest.json").exists()
    assert not (project / "mlflow.db").exists() and not list(project.parent.glob("mlflow.db"))


def test_the_local_server_survives_ctrl_c_and_kills_and_runs_left_running_are_closed(project, tmp_path):
    """Without PREFECT_API_URL the flow uses one long-lived local server, in a session of its own.

    Ctrl-C in a terminal reaches the flow's whole process group: the server must not be in it. A
    flow killed outright starts no stray server and leaves runs RUNNING that the next run closes.
    """
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env.update({"PREFECT_HOME": str(home), "PREFECT_PORT": str(free_port())})
    api = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    try:
        flow = start("-m", "flows.pipeline", "--set", "train.epochs=500", cwd=project, env=env, session=True)
        started = wait_for(flow, "epoch   2/500")
        assert any("starting a local Prefect server" in line for line in started)
        server_pid = (home / "server.pid").read_text()
        os.killpg(flow.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        flow.communicate(timeout=60)
        assert flow.returncode == 130
        assert healthy(api) and (home / "server.pid").read_text() == server_pid
        # The UI in a browser is told to find the API on this port, not on Prefect's default 4200.
        ui_settings = urllib.request.urlopen(api.removesuffix("/api") + "/ui-settings", timeout=10)
        assert json.load(ui_settings)["api_url"] == api

        (interrupted,) = mlflow_runs("KILLED")
        flow = start("-m", "flows.pipeline", cwd=project, env=env, session=True)
        wait_for(flow, f"resuming MLflow run {interrupted.info.run_id}")  # the same params: it goes on
        wait_for(flow, "/500 ")
        flow.kill()
        flow.wait()
        (orphan,) = mlflow_runs("RUNNING")
        assert orphan.info.run_id == interrupted.info.run_id

        again = sh(sys.executable, "-m", "flows.pipeline", "--set", "train.epochs=3", cwd=project, env=env)
        out = again.stdout + again.stderr
        assert "starting a local Prefect server" not in out  # reused, not a second one
        assert (home / "server.pid").read_text() == server_pid
        assert f"closed MLflow run {orphan.info.run_id} as KILLED" in out  # other params: it cannot resume
        assert [r.info.status for r in mlflow_runs()] == ["KILLED", "FINISHED"]
        # The Prefect flow run that the kill left RUNNING is closed too.
        assert "Crashed: its process" in out
        assert flow_run_states(env["PREFECT_PORT"]) == ["CRASHED", "CRASHED", "COMPLETED"]
    finally:
        stop = sh(sys.executable, "-m", "flows.server", "--stop", cwd=project, env=env, check=False)
    assert stop.returncode == 0
    assert not (home / "server.pid").exists() and not healthy(api)


def test_a_crashed_train_task_is_retried_by_prefect_and_resumes_in_the_same_run(prefect_api, project, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows import pipeline as flow
    from tasks import paths, train
    from tasks.files import sha256_file

    monkeypatch.setitem(flow.STEP_TASKS, "train", flow.STEP_TASKS["train"].with_options(retry_delay_seconds=0))
    real, calls = train.validate, {"n": 0}

    def crash_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's validation, once: the epoch-1 checkpoint is on disk
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "validate", crash_once)
    state = flow.pipeline(return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        task_runs = {r.name: r for r in client.read_task_runs(flow_run_filter=flow_run)}
    assert task_runs["train"].run_count == 2 and task_runs["evaluate"].run_count == 1
    runs = mlflow_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["train.resumed_from"].startswith("step-000000020-epoch-0001-")
    from tasks.tracking import client as mlflow_client

    history = mlflow_client().get_metric_history(runs[0].info.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    retried = sha256_file(paths.BEST)

    monkeypatch.setattr(train, "validate", real)
    assert flow.pipeline(force=True, return_state=True).is_completed()  # an uninterrupted training from scratch
    assert sha256_file(paths.BEST) == retried
    assert {r.info.status for r in mlflow_runs()} == {"FINISHED"}


def test_a_run_with_pull_takes_what_the_dvc_remote_has_and_runs_only_the_rest(
    prefect_api, project, tmp_path, monkeypatch
):
    """The flow pushes to the default remote; in a worker's fresh checkout, `pull` brings the data and outputs
    dvc.lock names, and no step needs to run."""
    from flows.pipeline import pipeline
    from tasks import paths
    from tasks.errors import DataError
    from tasks.files import sha256_file

    remote = tmp_path / "dvc-remote"  # the default remote, as the project's .dvc/config names it (see conftest)
    assert not remote.exists()
    assert pipeline(return_state=True).is_completed()
    assert "Cache and remote 'storage' are in sync" in dvc("status", "--cloud", cwd=project).stdout
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "trained", cwd=project)
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(project), str(fresh), cwd=tmp_path)
    monkeypatch.chdir(fresh)
    assert not paths.BEST.exists()

    state = pipeline(pull=True, return_state=True)
    assert state.is_completed()
    assert set(state.result().values()) == {"up to date"}  # every output came from the remote
    assert sha256_file(paths.BEST) == sha256_file(project / paths.BEST)
    assert "up to date" in dvc("status", cwd=fresh).stdout

    # Checkpoints newer than dvc.lock's (an interrupted training's) are left for the resume; an output
    # changed in the checkout and saved nowhere is not overwritten: one line names it.
    from dvc.repo import Repo

    from flows.pipeline import pull_data

    said, warned = [], []
    logger = SimpleNamespace(info=said.append, warning=warned.append)
    newer = fresh / paths.CHECKPOINTS / "step-000000999-epoch-0099-0123456789abcdef.pt"
    newer.write_bytes(b"an interrupted training's")
    with Repo(str(fresh)) as repo:
        pull_data(repo, logger)
    assert newer.exists() and not warned
    (fresh / paths.BEST).write_bytes(b"changed by hand")
    with Repo(str(fresh)) as repo, pytest.raises(DataError) as error:
        pull_data(repo, logger)
    assert str(error.value) == (
        "dvc pull would overwrite files changed in this checkout and saved nowhere (models/train/best.pt); "
        "`dvc commit` them or delete them, then run again"
    )
    assert (fresh / paths.BEST).read_bytes() == b"changed by hand"

    # Another fresh checkout, and a remote that cannot be reached: what it lacks is named in one warning,
    # and those stages are left to run. A remote of a kind this install cannot read: one line, naming it.
    other = tmp_path / "other"
    sh("git", "clone", "-q", str(project), str(other), cwd=tmp_path)
    dvc("remote", "modify", "--local", "storage", "url", "http://127.0.0.1:1/store", cwd=other)
    with Repo(str(other)) as repo:
        pull_data(repo, logger)
    (warning,) = warned
    assert re.fullmatch(
        r"pull: \d+ outputs are neither in the DVC cache nor on remote 'storage' \(not pushed yet, or the remote "
        r"cannot be reached\): data/prepared/\S+, .* \.\.\.; the stages that make them run",
        warning,
    ), warning
    assert "changed outs" in dvc("status", "prepare", cwd=other).stdout
    # A push after a successful run that the remote does not take fails nothing: one warning says so.
    from flows.pipeline import push_outputs

    (fresh / paths.BEST).unlink()
    dvc("checkout", "--force", cwd=fresh)  # back to what dvc.lock names
    dvc("remote", "modify", "--local", "storage", "url", "http://127.0.0.1:1/store", cwd=fresh)
    with Repo(str(fresh)) as repo:
        push_outputs(repo, logger)
    assert re.fullmatch(
        r"push: DVC remote 'storage' \(http://127.0.0.1:1/store\) did not take this run's outputs: .+; they are in "
        r"the local cache: `dvc push` sends them once the remote is back",
        warned[-1],
    ), warned[-1]
    dvc("remote", "modify", "--local", "storage", "url", "ssh://127.0.0.1:1/store", cwd=other)
    with Repo(str(other)) as repo, pytest.raises(DataError) as error:
        pull_data(repo, logger)
    assert str(error.value).startswith(
        "dvc pull from remote 'storage' failed: ssh is supported, but requires 'dvc-ssh'"
    )


def test_a_tracking_store_away_for_a_moment_is_retried_in_evaluate(prefect_api, project, monkeypatch):
    """A TrackingError in evaluate (the store did not answer once): Prefect retries the task, the run ends FINISHED."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows import pipeline as flow
    from tasks import tracking
    from tasks.errors import TrackingError

    monkeypatch.setitem(flow.STEP_TASKS, "evaluate", flow.STEP_TASKS["evaluate"].with_options(retry_delay_seconds=0))
    real, calls = tracking.log_metrics, {"n": 0}

    def away_once(run_id, metrics, *args, **kwargs):
        if any(k.startswith("test/") for k in metrics) and not calls["n"]:
            calls["n"] += 1
            raise TrackingError("the tracking store at sqlite:///mlflow.db does not answer (simulated)")
        return real(run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(tracking, "log_metrics", away_once)
    state = flow.pipeline(return_state=True)
    assert state.is_completed() and calls["n"] == 1
    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        task_runs = {r.name: r for r in client.read_task_runs(flow_run_filter=flow_run)}
    assert task_runs["evaluate"].run_count == 2 and task_runs["export"].run_count == 1
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED" and "pipeline.error" not in run.data.tags
    assert "test/accuracy" in run.data.metrics
