"""Shared fixtures: a throwaway copy of the project in its own git repository.

Every test that writes works in such a copy (tasks read and write paths relative to the
project root), with its own MLflow store, so the real project folder is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tasks", "flows", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]

# Offline and isolated: no telemetry, no Prefect state in the user's home.
os.environ.update(
    {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-"),
    }
)
os.environ.pop("PREFECT_API_URL", None)


def sh(*cmd: str | Path, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit code, fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def set_param(project: Path, old: str, new: str) -> None:
    """Edit params.yaml as a user would: replace one line's text."""
    path = project / "params.yaml"
    text = path.read_text()
    assert old in text, f"{old!r} not in params.yaml"
    path.write_text(text.replace(old, new, 1))


def make_project(dest: Path, edits: dict[str, str] | None = None) -> Path:
    """Copy the project's code and config into `dest`, apply param edits, commit it all with git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for old, new in (edits or {}).items():
        set_param(dest, old, new)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "project", cwd=dest)
    return dest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small, fast copy of the project (3 epochs), as the working directory."""
    path = make_project(tmp_path / "project", {"epochs: 30": "epochs: 3"})
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return path
