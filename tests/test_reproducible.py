"""Same code, same data, same params: the same bytes, whichever folder the clone lives in.

`dvc.lock` records the hash of every output, the exported models included; if any of them
depended on the clone's path or on the run, every fresh clone would be dirty after its first
run, and nobody could check a result by its hash.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import make_project, sh

pytestmark = pytest.mark.slow


def repro(path, store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    return sh(sys.executable, "-m", "dvc", "repro", cwd=path, env=env)


def test_a_fresh_clone_in_another_folder_reproduces_the_committed_dvc_lock(tmp_path):
    first = make_project(tmp_path / "a", {"epochs: 30": "epochs: 3"})
    repro(first, tmp_path / "a.db")
    sh("git", "add", "-A", cwd=first)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "results", cwd=first)
    assert sh("git", "status", "--porcelain", cwd=first).stdout == ""

    second = tmp_path / "elsewhere" / "at a different depth" / "b"
    sh("git", "clone", "-q", first, second, cwd=tmp_path)
    out = repro(second, tmp_path / "b.db").stdout
    # No DVC cache in a fresh clone: the models are made again. (evaluate may be skipped: its outputs are in
    # git, and DVC finds that train's new best.pt has exactly the hash that dvc.lock records.)
    for stage in ("prepare", "build", "train", "export"):
        assert f"Running stage '{stage}'" in out
    # dvc.lock (every output's hash, the TorchScript and torch.export files included), metrics and plots:
    # all exactly as committed.
    assert sh("git", "status", "--porcelain", cwd=second).stdout == ""
    assert (second / "dvc.lock").read_bytes() == (first / "dvc.lock").read_bytes()
