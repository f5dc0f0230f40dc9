"""`python -m tasks.reproduce RUN_ID`: a run made again from its commit, params and DVC-versioned data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import dvc, make_project, sh, start, wait_for
from tests.images import image_folder

PHOTOS = "data/raw/photos"


def reproduce(run_id: str, cwd: Path, store: str):
    return sh(
        sys.executable, "-m", "tasks.reproduce", run_id, cwd=cwd, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )  # fmt: skip


def lines(out: str) -> dict[str, str]:
    """The comparison's lines, by what they compare: {"weights": "identical  sha256 ..."}."""
    table = out[out.index("reproduction ") :].splitlines()[1:]
    return {line[2:26].strip(): line[26:].strip() for line in table if line.startswith("  ")}


@pytest.mark.slow
def test_a_run_is_reproduced_in_a_fresh_clone_with_its_data_from_the_remote_and_changed_data_is_reported(
    prefect_api, tmp_path, monkeypatch
):
    from tasks.tracking import client

    project = make_project(
        tmp_path / "project",
        {"dataset: digits ": "dataset: imagefolder", "root: data/raw ": f"root: {PHOTOS}",
         "image_size: null": "image_size: 16", "epochs: 30": "epochs: 3"},
    )  # fmt: skip
    image_folder(project / PHOTOS, per_class=20, classes=4)
    dvc("add", PHOTOS, cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "photos", cwd=project)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # The flow as users run it, in a process of its own: TorchScript's bytes depend on what the
    # process scripted before (see README, Reproducibility), and this one has scripted other models.
    flow_env = {**os.environ, "PREFECT_API_URL": prefect_api}

    def pipeline() -> None:
        sh(sys.executable, "-m", "flows.pipeline", cwd=project, env=flow_env)

    # The flow trains, registers and pushes the data and models to the default remote.
    pipeline()
    first = json.loads((project / "models/train/run.json").read_text())["run_id"]

    # A fresh clone elsewhere, and no cache left where the run was made: the photos can only come from
    # the remote.
    shutil.rmtree(project / ".dvc/cache")
    fresh = tmp_path / "elsewhere" / "fresh"
    sh("git", "clone", "-q", project, fresh, cwd=tmp_path)
    assert not (fresh / PHOTOS).exists()
    done = reproduce(first, fresh, store)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"reproduce: data restored: {PHOTOS}.dvc" in done.stdout
    table = lines(done.stdout)
    for what in ("params", "data photos-train", "data photos-val", "data photos-test", "prepare inputs",
                 "train inputs", "metrics", "weights", "outputs"):  # fmt: skip
        assert table[what].startswith("identical"), (what, table)
    assert re.match(r"identical  (\d+) of \1, test/accuracy 0\.\d{4}, test/f1_macro", table["metrics"]), table
    assert "result: identical" in done.stdout
    c = client()
    copy = c.get_run(done.stdout.split("reproduction ")[1].split()[0])
    original = c.get_run(first)
    assert copy.info.status == "FINISHED" and copy.info.run_id != first
    assert copy.data.tags["reproduction.of"] == first and copy.data.tags["reproduction.result"] == "identical"
    assert copy.info.run_name == f"{original.info.run_name} (reproduction)"
    assert copy.data.tags["train.best_sha256"] == original.data.tags["train.best_sha256"]
    assert copy.data.metrics["test/accuracy"] == original.data.metrics["test/accuracy"]
    # Nothing registered, the worktree gone, the clone untouched.
    assert [int(v.version) for v in c.search_model_versions("name = 'classifier'")] == [1]
    assert len(sh("git", "worktree", "list", cwd=fresh).stdout.splitlines()) == 1
    assert sh("git", "status", "--porcelain", cwd=fresh).stdout == ""

    # Terminated in train: exit 143, no MLflow run left RUNNING, no worktree and no process left.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = start("-m", "tasks.reproduce", first, cwd=fresh, env=env, session=True)
    said = "".join(wait_for(proc, "Running stage 'train'"))
    worktree = said.split("dvc repro --force evaluate export in ")[1].split()[0]
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("error: reproduce: terminated (SIGTERM)")
    assert len(sh("git", "worktree", "list", cwd=fresh).stdout.splitlines()) == 1
    assert not Path(worktree).exists() and sh("pgrep", "-f", worktree, cwd=tmp_path, check=False).stdout == ""
    assert c.search_runs([original.info.experiment_id], "attributes.status = 'RUNNING'") == []  # none left open

    # The photos changed in the checkout without `dvc add`: the commit does not hold what the next run
    # trained on. Its reproduction restores the committed photos, and says what differs.
    image = sorted((project / PHOTOS / "2").iterdir())[0]
    Image.open(image).rotate(30).save(image)
    pipeline()
    second = json.loads((project / "models/train/run.json").read_text())["run_id"]
    assert second != first
    done = reproduce(second, fresh, store)
    assert done.returncode == 11, done.stdout[-3000:] + done.stderr[-3000:]
    table = lines(done.stdout)
    assert table["prepare inputs"].startswith(f"DIFFERS    differ: {PHOTOS} ")
    assert (
        table["data photos-train"].startswith("DIFFERS")
        or table["data photos-val"].startswith("DIFFERS")
        or (table["data photos-test"].startswith("DIFFERS"))
    )
    assert table["params"].startswith("identical") and table["outputs"].startswith("DIFFERS")
    assert "result: differs (" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "error: reproduce: the reproduction is not identical to the run (see above)"
    )
    copy = c.search_runs([copy.info.experiment_id], f"tags.`reproduction.of` = '{second}'")[0]
    assert copy.data.tags["reproduction.result"] == "differs"
    # A reproduction is no run of record: one line points at the run it reproduced.
    again = reproduce(copy.info.run_id, fresh, store)
    assert again.returncode == 4 and again.stderr.strip() == (
        f"error: reproduce: run {copy.info.run_id} is itself a reproduction, of run {second}: reproduce that one"
    )


def test_a_run_with_uncommitted_changes_is_not_exactly_reproducible():
    from tasks.reproduce import Check, dirty_reason, show

    assert dirty_reason({"git.dirty": "false", "git.uncommitted": ""}) is None
    # params.yaml differing from the commit is no reason: the run logged the params, a reproduction restores them
    assert dirty_reason({"git.dirty": "true", "git.uncommitted": ""}) is None
    assert dirty_reason({"git.dirty": "true", "git.uncommitted": "tasks/train.py"}) == (
        "it was made with uncommitted changes to tasks/train.py"
    )
    assert "git.dirty true" in dirty_reason({"git.dirty": "true"})  # a run from before git.uncommitted
    same = [Check("weights", True, "sha256 45e67250bded")]
    assert "result: identical" in show(same, None, "a", "b").splitlines()
    out = show(same, "it was made with uncommitted changes to tasks/train.py", "a", "b")
    assert "result: identical to the run, but not exactly reproducible: it was made with uncommitted changes" in out


@pytest.mark.slow
def test_a_run_that_cannot_be_reproduced_says_why_in_one_line(trained, tmp_path):
    """A run id the store lacks, and a commit the clone lacks: one line each, exit 4, no worktree left."""
    store = os.environ["MLFLOW_TRACKING_URI"]
    done = reproduce("0" * 32, trained, store)
    assert done.returncode == 4
    missing = f"no MLflow run {'0' * 32} in {store}; the run page's URL shows its id"
    assert done.stderr.strip() == f"error: reproduce: {missing}"
    from tasks.tracking import client

    c = client()
    (run,) = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id])
    c.set_tag(run.info.run_id, "mlflow.source.git.commit", "f" * 40)
    done = reproduce(run.info.run_id, trained, store)
    assert done.returncode == 4
    assert done.stderr.strip() == (
        f"error: reproduce: commit ffffffffffff of run {run.info.run_id} is not in this clone: `git fetch` the "
        "branch it is on (or push it from where the run was made), then run again"
    )
    assert len(sh("git", "worktree", "list", cwd=trained).stdout.splitlines()) == 1
    inside = sh(sys.executable, "-m", "tasks.reproduce", run.info.run_id, "--keep", "repro", cwd=trained, check=False)
    assert inside.returncode == 4
    assert (
        inside.stderr.strip()
        == "error: reproduce: --keep repro: the folder is inside this checkout; name one outside it"
    )
