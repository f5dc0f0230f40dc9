"""The real `dvc repro` in a temporary git repository, on the default params.

One first repro is shared: the tests that only read it use `repo`; every test that changes
something (params, commits, MLflow runs) works on its own copy (`changed`), so the tests pass in
any order and one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tasks import STAGES
from tasks.files import sha256_file
from tasks.tracking import tracking_uri
from tests.conftest import OUTPUTS, clone, dvc, make_project, python, set_param, sh, start, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("dvc")
    path = make_project(tmp / "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.chdir(path)
        first = dvc("repro", cwd=path)
    return tmp, first


@pytest.fixture
def repo(first_repro, monkeypatch: pytest.MonkeyPatch):
    """The shared first repro, for tests that only look at it."""
    tmp, first = first_repro
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    monkeypatch.chdir(tmp / "project")
    return tmp / "project", first


@pytest.fixture
def changed(first_repro, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the first repro and its MLflow store, for a test that changes things."""
    return clone(first_repro[0], tmp_path / "copy", monkeypatch)


def prepared_test_images(path: Path) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.load(path / "data/prepared/test-images.npy")).float()


def mlflow_runs(path: Path):
    from tasks.tracking import client

    c = client()
    experiment = c.get_experiment_by_name("pipeline")
    return c, c.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_first_repro_runs_every_stage_and_reaches_097(repo):
    path, first = repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    for out in OUTPUTS:
        assert (path / out).stat().st_size > 0, out
    accuracy = json.loads((path / "metrics/evaluate.json").read_text())["test"]["accuracy"]
    assert accuracy >= 0.97


def test_second_repro_runs_nothing(repo):
    path, _ = repo
    again = dvc("repro", cwd=path)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date." in again.stdout
    assert "up to date" in dvc("status", cwd=path).stdout


def test_metrics_and_plots_commands_read_the_outputs(repo):
    path, _ = repo
    shown = json.loads(dvc("metrics", "show", "--json", cwd=path).stdout)
    metrics = shown[""]["data"]
    assert metrics["metrics/evaluate.json"]["data"]["test"]["accuracy"] >= 0.97
    assert metrics["metrics/train.json"]["data"]["best_epoch"] >= 1
    assert "metrics/evaluate.json" in dvc("metrics", "diff", "--all", cwd=path).stdout
    dvc("plots", "show", "-o", "dvc_plots", cwd=path)
    html = (path / "dvc_plots/index.html").read_text()
    # Each plot of dvc.yaml once, under an id made from its path (tests/test_plots.py checks the page itself).
    for plot in (
        "train.csv",
        "confusion.csv",
        "confusion.png",
        "data/counts.csv",
        "data/sizes.csv",
        "data/samples.png",
    ):  # noqa: E501
        assert html.count(f'"plots_{plot.replace("/", "_").replace(".", "_")}"') == 1, plot


def test_exports_match_eager_in_a_process_without_project_code(repo, tmp_path):
    """Load each export with torch alone, from an empty folder, and compare with the eager model."""
    path, _ = repo
    from tasks import inputs
    from tasks.params import load

    model = inputs.model(load(path / "params.yaml"), path / "models/export/model_state.pt", "export").eval()
    x = prepared_test_images(path)
    with torch.no_grad():
        expected = model(x)
    torch.save({"x": x}, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        assert not any(m.split(".")[0] in ("tasks", "flows") for m in sys.modules)
        x = torch.load("x.pt", weights_only=True)["x"]
        with torch.no_grad():
            ts = torch.jit.load({str(path / "models/export/model.ts")!r})(x)
            ep = torch.export.load({str(path / "models/export/model.pt2")!r}).module()(x)
        torch.save({{"ts": ts, "ep": ep}}, "out.pt")
        """
    )
    sh(sys.executable, "-I", "-c", script, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    info = json.loads((path / "models/export/model.json").read_text())
    for name in ("ts", "ep"):
        assert torch.allclose(out[name], expected, atol=info["check"]["atol"], rtol=0)
    assert info["classes"] == [str(i) for i in range(10)] and info["input"]["shape"] == ["batch", 1, 8, 8]


def test_one_mlflow_run_with_params_curves_metrics_lineage_and_model(repo):
    path, _ = repo
    import mlflow

    c, runs = mlflow_runs(path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["build.model"] == "cnn"
    assert len(c.get_metric_history(run.info.run_id, "val/accuracy")) == 30
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 31))
    test_accuracy = json.loads((path / "metrics/evaluate.json").read_text())["test"]["accuracy"]
    assert run.data.metrics["test/accuracy"] == pytest.approx(test_accuracy)
    commit = sh("git", "rev-parse", "HEAD", cwd=path).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git.dirty"] == "false" and run.data.tags["git.uncommitted"] == ""
    assert run.data.tags["orchestrator"] == "dvc"
    artifacts = {a.path for folder in ("data", "params", "plots") for a in c.list_artifacts(run.info.run_id, folder)}
    assert {"data/manifest.json", "params/params.yaml", "plots/confusion.png", "plots/train.csv"} <= artifacts

    mlflow.set_tracking_uri(tracking_uri())
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = prepared_test_images(path)
    scripted = torch.jit.load(path / "models/export/model.ts")
    with torch.no_grad():
        assert torch.equal(logged(x).argmax(1), scripted(x).argmax(1))


def failing_repro(path: Path, old: str, new: str) -> subprocess.CompletedProcess:
    """`dvc repro` with one params.yaml line edited (then restored): it must fail and change no output."""
    before = {out: sha256_file(path / out) for out in OUTPUTS}
    lock = (path / "dvc.lock").read_text()
    set_param(path, old, new)
    try:
        failed = dvc("repro", cwd=path, check=False)
    finally:
        set_param(path, new, old)
    assert failed.returncode != 0
    assert {out: sha256_file(path / out) for out in OUTPUTS} == before
    assert (path / "dvc.lock").read_text() == lock
    return failed


def test_misspelt_key_fails_with_one_line_and_keeps_outputs(changed):
    path = changed
    failed = failing_repro(path, "epochs: 30", "epocs: 30")
    assert "error: params.yaml: train.epocs: unknown key (did you mean 'epochs'?)" in failed.stderr.splitlines()
    assert "up to date" in dvc("status", cwd=path).stdout


def test_a_diverging_learning_rate_fails_the_repro_and_keeps_the_good_model(changed):
    path = changed
    failed = failing_repro(path, "lr: 0.003", "lr: 10")
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: train: training diverged at epoch 1: train/loss ")
    assert line.endswith("most likely train.lr (now 10): lower it, e.g. --set train.lr=1")
    assert "exited with 5" in failed.stderr  # the stage's exit code, as DVC reports it


PLANT = textwrap.dedent(
    """
    import os, pickle, re, shutil, sys, zipfile, hashlib

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[3],))

    src, dst, marker, kind = sys.argv[1:5]
    shutil.copytree(src, dst)
    if kind == "pt2":  # swap the pickled sample inputs inside the torch.export archive
        archive = os.path.join(dst, "data", "model.pt2")
        with zipfile.ZipFile(archive) as z:
            items = [(i, z.read(i.filename)) for i in z.infolist()]
        with zipfile.ZipFile(archive, "w") as z:
            for info, data in items:
                z.writestr(info, pickle.dumps(Payload()) if info.filename.endswith("sample_inputs/model.pt") else data)
    else:  # a TorchScript archive whose pickle calls os.system, and the hash that guards it, replaced
        ts = os.path.join(dst, "artifacts", "model.ts")
        with zipfile.ZipFile(ts) as z:
            items = [(i, z.read(i.filename)) for i in z.infolist()]
        with zipfile.ZipFile(ts, "w") as z:
            for info, data in items:
                z.writestr(info, pickle.dumps(Payload(), protocol=2) if info.filename.endswith("/data.pkl") else data)
        if kind == "pyfunc-same-hash":
            sys.exit(0)
        mlmodel = os.path.join(dst, "MLmodel")
        text = open(mlmodel).read()
        digest = hashlib.sha256(open(ts, "rb").read()).hexdigest()
        open(mlmodel, "w").write(re.sub(r"sha256: \\w+", "sha256: " + digest, text))
    """
)
LOAD = textwrap.dedent(
    """
    import sys
    import tasks.tracking  # the project's defaults, as in every pipeline process
    import mlflow
    try:
        (mlflow.pytorch if sys.argv[2] == "pt2" else mlflow.pyfunc).load_model(sys.argv[1])
        print("loaded")
    except Exception as exc:
        print("refused:", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
    """
)


@pytest.mark.parametrize(
    ("name", "kind", "refusal"),
    [
        ("model", "pt2", "Deserializing model using pickle is disallowed"),
        ("torchscript", "pyfunc-same-hash", "is not the file that was logged (sha256 differs): refusing to load it"),
        ("torchscript", "pyfunc", "Unknown type name 'posix.system'"),  # hash forged too: TorchScript refuses it
    ],
)
def test_a_pickle_planted_in_a_copy_of_the_logged_model_does_not_run(repo, tmp_path, name, kind, refusal):
    path, _ = repo
    import mlflow

    _, runs = mlflow_runs(path)
    mlflow.set_tracking_uri(tracking_uri())
    original = mlflow.artifacts.download_artifacts(f"runs:/{runs[0].info.run_id}/{name}", dst_path=str(tmp_path / "dl"))
    marker = tmp_path / "payload-ran"
    sh(sys.executable, "-c", PLANT, original, tmp_path / "planted", marker, kind, cwd=tmp_path)

    env = {**os.environ, "PYTHONPATH": str(path)}
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    loaded = sh(sys.executable, "-c", LOAD, tmp_path / "planted", kind, cwd=path, env=env)
    assert loaded.stdout.startswith("refused:") and refusal in loaded.stdout
    assert not marker.exists()
    # The untouched model still loads under the same settings.
    assert sh(sys.executable, "-c", LOAD, original, kind, cwd=path, env=env).stdout.strip() == "loaded"
    # The control: the planted copy does run its payload where loading allows pickle.
    if kind == "pt2":  # MLflow's own default
        sh(
            sys.executable,
            "-c",
            LOAD,
            tmp_path / "planted",
            kind,
            cwd=path,
            env={**env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        )
    else:  # plain unpickling of the planted archive's data.pkl, which TorchScript never does
        ts = tmp_path / "planted/artifacts/model.ts"
        sh(
            sys.executable,
            "-c",
            f"import zipfile, pickle; z = zipfile.ZipFile({str(ts)!r}); "
            "pickle.loads(z.read([n for n in z.namelist() if n.endswith('/data.pkl')][0]))",
            cwd=tmp_path,
        )
    assert marker.exists()


def locked_md5(path: Path) -> dict[str, str]:
    """{output path: md5} as dvc.lock records them now."""
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}


def test_changing_the_learning_rate_reruns_train_and_after_with_lineage_on_both_runs(changed, tmp_path):
    path = changed
    sh("git", "add", "-A", cwd=path)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "results", cwd=path)
    before = locked_md5(path)
    set_param(path, "lr: 0.003", "lr: 0.004")
    out = dvc("repro", cwd=path).stdout
    assert "Stage 'prepare' didn't change" in out and "Stage 'build' didn't change" in out
    for stage in ("train", "evaluate", "export", "promote"):
        assert f"Running stage '{stage}'" in out
    diff = dvc("params", "diff", cwd=path).stdout
    assert "train.lr" in diff and "0.003" in diff and "0.004" in diff
    assert "metrics/train.json" in dvc("metrics", "diff", "--all", cwd=path).stdout
    c, runs = mlflow_runs(path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2 and finished[1].data.params["train.lr"] == "0.004"
    assert "test/accuracy" in finished[1].data.metrics
    first, second = finished
    assert second.data.tags["git.dirty"] == "true"  # params.yaml differs from the commit

    # Lineage on both runs: names that tell them apart, the effective params' hash, the software and device,
    # every DVC output as dvc.lock recorded it then, the data as dataset inputs with their DVC hashes.
    assert (first.info.run_name, second.info.run_name) == ("cnn-digits", "cnn-digits lr=0.004")
    assert first.data.tags["lineage.params_sha256"] != second.data.tags["lineage.params_sha256"]
    for run, locked in ((first, before), (second, locked_md5(path))):
        tags = run.data.tags
        assert tags["lineage.torch"] == torch.__version__ and tags["lineage.device"].startswith("cpu (")
        shown = python("-m", "tasks.lineage", run.info.run_id, "--json", cwd=path, check=True).stdout
        assert {o["path"]: o["md5"] for o in json.loads(shown)["dvc_outputs"]} == locked
        digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        splits = ("train", "val", "test")
        assert digests == {f"digits-{s}": locked[f"data/prepared/{s}-images.npy"] for s in splits}
    assert before["models/export/model.pt2"] != locked_md5(path)["models/export/model.pt2"]
    assert first.data.tags["dvc.prepare.outs"] == second.data.tags["dvc.prepare.outs"]
    assert first.data.tags["dvc.train.outs"] != second.data.tags["dvc.train.outs"]

    # From the first run's id to its files: restored from DVC's cache, the export the first run logged.
    restored = tmp_path / "first"
    shown = python("-m", "tasks.lineage", first.info.run_id, "--restore", str(restored), cwd=path, check=True)
    assert f"into {restored}" in shown.stdout
    pt2 = restored / "models/export/model.pt2"
    assert (
        sha256_file(pt2)
        == first.data.tags["export.sha256.torch_export"]
        != sha256_file(path / "models/export/model.pt2")
    )
    assert len(list((restored / "models/train/checkpoints").iterdir())) == 2
    text = python("-m", "tasks.lineage", first.info.run_id, cwd=path, check=True).stdout
    assert "models:/classifier/1 @challenger, @champion" not in text  # the second run took @challenger
    assert "models:/classifier/1 @champion" in text and f"commit {first.data.tags['mlflow.source.git.commit']}" in text

    # The registry: the second model stays challenger, as it was made from uncommitted params.
    assert second.data.tags["promote.decision"] == "refused" and "git.dirty true" in second.data.tags["promote.reason"]
    assert c.get_model_version_by_alias("classifier", "champion").run_id == first.info.run_id
    assert c.get_model_version_by_alias("classifier", "challenger").run_id == second.info.run_id


def test_a_param_that_changes_no_weight_links_the_earlier_results(changed):
    """Train reruns (its params changed) to the same weights, so DVC skips evaluate and export; the new
    MLflow run still shows the test results."""
    path = changed
    set_param(path, "keep: 2", "keep: 3")  # how many checkpoints to keep: train reruns, from epoch 1
    out = dvc("repro", cwd=path).stdout
    assert "Running stage 'train'" in out and "ends a finished training; training again from epoch 1" in out
    assert "Stage 'evaluate' didn't change" in out and "Stage 'export' didn't change" in out
    assert len(list((path / "models/train/checkpoints").iterdir())) == 3
    c, runs = mlflow_runs(path)
    earlier, new = runs[-2], runs[-1]
    assert new.data.params["train.checkpoint.keep"] == "3"
    assert new.data.tags["pipeline.same_model_as"] == earlier.info.run_id
    assert new.data.metrics["test/accuracy"] == earlier.data.metrics["test/accuracy"]
    assert {m.model_id for m in new.outputs.model_outputs} == {m.model_id for m in earlier.outputs.model_outputs}
    assert f"the same weights as MLflow run {earlier.info.run_id}" in out

    # Once more: the latest run with results is now the one that carried them over; its models still come.
    set_param(path, "keep: 3", "keep: 4")
    dvc("repro", cwd=path)
    c, runs = mlflow_runs(path)
    third = runs[-1]
    assert third.data.tags["pipeline.same_model_as"] == new.info.run_id
    assert third.data.metrics["test/accuracy"] == earlier.data.metrics["test/accuracy"]
    assert {m.model_id for m in third.outputs.model_outputs} == {m.model_id for m in earlier.outputs.model_outputs}


def test_no_telemetry_is_configured():
    assert "analytics = false" in (Path(__file__).resolve().parents[1] / ".dvc/config").read_text()
    env = {"PATH": "/usr/bin:/bin"}
    probe = "import tasks.tracking, os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1]
    )
    assert proc.stdout.strip() == "true"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_repro_killed_mid_epoch_resumes_to_the_same_weights_in_the_same_run(changed, signum):
    """Kill `dvc repro` while train is in its 4th epoch; the next `dvc repro` ends where an uninterrupted one does."""
    uninterrupted = sha256_file(changed / "models/train/best.pt")  # the first repro's, 30 epochs
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = start("-m", "dvc", "repro", "--force", "--single-item", "train", cwd=changed, env=env, session=True)
    wait_for(proc, "epoch   3/30")
    os.killpg(proc.pid, signum)  # the whole process group, as a terminal's Ctrl-C or a machine going down
    proc.communicate(timeout=120)
    c, runs = mlflow_runs(changed)
    interrupted = runs[-1]
    assert interrupted.info.status == ("RUNNING" if signum == signal.SIGKILL else "KILLED")
    assert sha256_file(changed / "models/train/best.pt") == uninterrupted  # not replaced by a half run

    again = dvc("repro", cwd=changed)
    assert f"resuming MLflow run {interrupted.info.run_id}" in again.stdout
    assert "Running stage 'evaluate'" not in again.stdout  # the same weights: nothing after train to redo
    assert sha256_file(changed / "models/train/best.pt") == uninterrupted
    c, after = mlflow_runs(changed)
    assert [r.info.run_id for r in after] == [r.info.run_id for r in runs]  # no new run
    assert {r.info.status for r in after} == {"FINISHED"}  # and none left RUNNING
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert sorted(m.step for m in c.get_metric_history(interrupted.info.run_id, key)) == list(range(1, 31)), key
    assert "up to date" in dvc("status", cwd=changed).stdout


def test_a_dvc_experiment_and_its_mlflow_run_share_a_name(changed):
    """`dvc exp run` names the experiment; the MLflow run it makes carries that name after its own."""
    path = changed
    sh("git", "add", "-A", cwd=path)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "results", cwd=path)
    dvc("exp", "run", "-n", "lower-lr", "-S", "train.lr=0.002", cwd=path)
    _, runs = mlflow_runs(path)
    run = max(runs, key=lambda r: r.info.start_time)
    assert run.info.run_name == "cnn-digits lr=0.002 [lower-lr]"
    assert run.data.tags["dvc.experiment"] == "lower-lr" and run.data.tags["git.dirty"] == "true"
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.stage"] == "promote"
    assert "`train.lr`: 0.003 → 0.002" in run.data.tags["mlflow.note.content"]
    rows = dvc("exp", "show", "--only-changed", "--csv", cwd=path).stdout.splitlines()
    assert any("lower-lr" in row and "0.002" in row for row in rows)
