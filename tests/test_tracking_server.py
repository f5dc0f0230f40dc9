"""A shared MLflow tracking server (scripts/tracking-server.sh) on a throw-away PostgreSQL: the pipeline
logs to it, stops in one line when it is not there, and loses nothing when it goes away mid-training."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import create_database, dvc, free_port, make_project, query, start, wait_for

pytestmark = pytest.mark.slow

EPOCHS = 300  # about 30 s of training: long enough to stop and restart the server in the middle


@contextmanager
def tracking_server(project: Path, database: str, artifacts: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """scripts/tracking-server.sh as the README runs it, until it answers; yields its process; stops it after."""
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": database,
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_PORT": str(port),
        "VENV": sys.prefix,
    }
    url = f"http://127.0.0.1:{port}"
    with log.open("a") as out:
        server = subprocess.Popen(
            ["bash", "scripts/tracking-server.sh"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the tracking server exited {server.returncode}:\n{log.read_text()}"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            assert time.monotonic() < deadline, f"the tracking server did not answer in 180 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_pipeline_logs_to_a_shared_server_and_loses_nothing_when_it_restarts_mid_training(postgres, tmp_path):
    project = make_project(tmp_path / "project", {"epochs: 30": f"epochs: {EPOCHS}"})
    database = create_database(postgres, "mlflow").replace("postgresql+asyncpg://", "postgresql://")
    artifacts, port, log = tmp_path / "artifacts", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    # Few, quick retries: a call that fails while the server is away fails within seconds (by default
    # MLflow retries for about 4 minutes), so the pipeline's own keep-and-resend is what is tested.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }

    # No server yet: the run stops before training, in one line that names the server and the fix.
    first = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert first.returncode != 0
    assert f"error: train: MLflow tracking server {url} does not answer" in first.stderr
    assert "start it, or unset MLFLOW_TRACKING_URI" in first.stderr
    assert "epoch " not in first.stdout and not (project / "models/train/best.pt").exists()

    with tracking_server(project, database, artifacts, port, log) as server:
        proc = start("-m", "dvc", "repro", cwd=project, env=env, session=True)
        try:
            wait_for(proc, f"epoch  10/{EPOCHS}")
            # The server goes away mid-training; training goes on without it.
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            seen = wait_for(proc, f"epoch  40/{EPOCHS}")
            assert proc.poll() is None  # still training, 30 epochs on, with no server
        except BaseException:
            proc.kill()
            raise
    # ... and back: the same database, the same artifacts.
    with tracking_server(project, database, artifacts, port, log):
        rest, _ = proc.communicate(timeout=600)
        out = "".join(seen) + rest
        assert proc.returncode == 0, out[-5000:]
        assert f"epoch {EPOCHS}/{EPOCHS}" in out
        assert "epochs' metrics did not reach the store" in out  # kept, and sent once the server was back

        from mlflow import MlflowClient

        c = MlflowClient(url)
        (run,) = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/loss", "val/accuracy"):
            steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (key, len(steps))
        assert run.data.metrics["test/accuracy"] > 0.9
        # PostgreSQL holds them: every epoch once.
        rows = query(database.replace("postgresql://", "postgresql+asyncpg://"),
                     "select count(*), count(distinct step) from metrics where key = 'train/loss'")  # fmt: skip
        assert rows == [(EPOCHS, EPOCHS)]
        # The models went through the server into its artifact folder, and the champion loads from it.
        assert any(artifacts.rglob("MLmodel")) and not (project / "mlruns").exists()
        env_load = {**env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
        loaded = subprocess.run(
            [sys.executable, "-c", "import mlflow.pytorch, torch; m = mlflow.pytorch.load_model("
             "'models:/classifier@champion'); print(m(torch.zeros(1, 1, 8, 8)).shape)"],
            cwd=tmp_path, env=env_load, capture_output=True, text=True,
        )  # fmt: skip
        assert loaded.stdout.strip() == "torch.Size([1, 10])", loaded.stderr[-2000:]
    assert "up to date" in dvc("status", cwd=project).stdout
