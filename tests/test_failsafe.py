"""Bad runs, broken files, dead stores and kills: one clear line, a distinct exit code, nothing half-done.

Each test starts from a project that has run every step once (`trained`), breaks one thing the
way a user or a machine would, and checks what the user sees (the message, the exit code) and
what is left (every previous output byte-identical, not even rewritten; no temporary files; no
MLflow run left RUNNING).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tasks import build, evaluate, export, paths, prepare, tracking, train
from tasks.errors import InputError, OutputError, TrackingError, TrainingError
from tasks.files import process_id, sha256_file, staged
from tasks.params import load
from tests.conftest import free_port, immutable, leftovers, one_line_error, python, sh, snapshot, start, wait_for


def runs(status: str | None = None) -> list:
    c = tracking.client()
    found = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id], order_by=["attributes.start_time"])
    return [r for r in found if status is None or r.info.status == status]


class Payload:
    """A pickle that runs a command when loaded: what someone who can write a file could plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- 1. A diverging run stops before it can replace the good model ---------------------------------


def test_a_diverging_run_stops_at_once_and_keeps_the_previous_model(trained):
    before = snapshot(trained)
    with pytest.raises(TrainingError) as exc:
        train.run(load(overrides=["train.lr=10"]))
    message = str(exc.value)
    assert message.startswith("training diverged at epoch 1: train/loss ")
    assert (
        "(limit: train.divergence_factor 10); most likely train.lr (now 10): lower it, e.g. --set train.lr=1" in message
    )
    assert snapshot(trained) == before and not leftovers(trained)
    last = runs()[-1]
    assert last.info.status == "FAILED" and last.data.tags["pipeline.error"] == message


def test_a_run_stuck_at_chance_names_the_param_at_fault(trained):
    before = snapshot(trained)
    params = load(overrides=["train.label_smoothing=0.99", "train.lr=0.05", "train.chance_epochs=2", "train.epochs=4"])
    with pytest.raises(
        TrainingError,
        match=r"^training is stuck at chance after epoch [234]: the best val/accuracy so far, 0\.\d+, is no",
    ):
        train.run(params)
    with pytest.raises(TrainingError, match=r"most likely train.label_smoothing \(now 0.99\): lower it$"):
        train.run(params)
    assert snapshot(trained) == before


def test_a_loss_that_is_nan_before_any_step_blames_the_data_not_the_learning_rate(trained, monkeypatch):
    class NaNLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    monkeypatch.setattr(train, "build_loss", lambda cfg: NaNLoss())
    with pytest.raises(TrainingError, match=r"train/loss is nan; the untrained model's loss is already nan"):
        train.run(load())


@pytest.mark.parametrize(
    ("overrides", "first", "last", "culprit"),
    [
        (["train.lr=0.5", "train.weight_decay=1"], 2.3, 2.3, "train.weight_decay (now 1)"),
        (["train.lr=1"], 2.3, 1e6, "train.lr (now 1): lower it, e.g. --set train.lr=0.1"),
        (["train.lr=1e-6"], 2.3, 2.3, "train.lr (now 1e-06), too small: raise it, e.g. --set train.lr=1e-05"),
        (["build.dropout=0.95"], 2.3, 2.3, "build.dropout (now 0.95): lower it"),
        ([], 2.3, 0.2, "the model fits the train split but not val"),
        ([], math.nan, math.nan, "the untrained model's loss is already nan"),
    ],
)
def test_the_hint_names_the_param_most_likely_at_fault(overrides, first, last, culprit):
    params = load(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
    assert culprit in train.suspect(params, first, last, n_classes=10)


# -- 3. Outputs are replaced only after MLflow logging succeeded -------------------------------------


@pytest.mark.parametrize("step", [train, evaluate, export])
def test_a_store_that_fails_while_logging_leaves_every_output_as_it_was(trained, monkeypatch, step):
    def store_goes_away(*args, **kwargs):
        raise TrackingError("MLflow store sqlite:///gone.db: unable to open database file")

    calls = []

    def log_artifacts(run_id, folder, paths):
        calls.append(folder)
        if step is not train or len(calls) > 2:  # train logs its inputs first: fail at the end, after training
            store_goes_away()

    monkeypatch.setattr(tracking, "log_artifacts", log_artifacts)
    before = snapshot(trained)
    with pytest.raises(TrackingError, match="unable to open database file"):
        step.run(load())
    assert snapshot(trained) == before
    assert not leftovers(trained)


def test_the_later_steps_find_the_run_by_the_model_even_when_run_json_is_broken(trained):
    (trained / "models/train/run.json").write_text('{"run_id": "0000", "tracking_uri"')  # invalid JSON
    evaluate.run(load())
    run = runs()[-1]
    assert run.data.tags[tracking.MODEL_TAG] == sha256_file(paths.BEST)
    assert "test/accuracy" in run.data.metrics


def test_a_store_without_the_models_run_is_a_clear_error(trained, tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    tracking.client().search_experiments()  # an existing, empty store
    before = snapshot(trained)
    with pytest.raises(TrackingError) as exc:
        export.run(load())
    assert str(exc.value) == (
        f"the model in models/train was logged to sqlite:///{tmp_path / 'mlflow.db'}, but "
        f"MLFLOW_TRACKING_URI is {other}: use the same store, or train again: dvc repro --force --downstream train"
    )
    (trained / "models/train/run.json").unlink()  # the local note is gone too: nothing says where the run is
    with pytest.raises(TrackingError) as exc:
        export.run(load())
    assert str(exc.value).startswith(f"no MLflow run in {other} trained models/train/best.pt (sha256 ")
    assert str(exc.value).endswith("train again to log a new run: dvc repro --force --downstream train")
    assert snapshot(trained) == before


# -- 5. Temporary files: cleaned up, never in /tmp ---------------------------------------------------


def test_export_leaves_no_temporary_files_and_sweeps_those_of_killed_processes(trained, tmp_path, monkeypatch):
    dead = trained / "models/export/.999999.killed.tmp"  # what a SIGKILLed export leaves
    dead.mkdir()
    (dead / "model.ts").write_bytes(b"half")
    alive = trained / f"models/export/.{os.getppid()}.running.tmp"  # another live process's: kept
    alive.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # for the fresh-process check
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # for this process
    export.run(load())
    assert not dead.exists() and alive.exists()
    assert list(scratch.iterdir()) == []  # the fresh-process check gets its inputs on stdin


@pytest.fixture
def nearly_full_export_folder(trained, tmp_path):
    """models/export on a tiny file system that holds the previous export and little more (root only)."""
    folder = trained / "models/export"
    mount = tmp_path / "small-disk"
    mount.mkdir()
    used = sum(f.stat().st_size for f in folder.iterdir())
    size = f"size={used + 64 * 1024}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        for f in folder.iterdir():
            shutil.copy2(f, mount / f.name)
        shutil.rmtree(folder)
        folder.symlink_to(mount)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_export(trained, nearly_full_export_folder):
    before = snapshot(trained)
    # torch's own writers abort the process on a full disk; serialized through memory, it is one line.
    with pytest.raises(OutputError) as exc:
        export.run(load())
    assert str(exc.value) == "cannot write models/export: No space left on device; free some disk space and run again"
    assert snapshot(trained) == before
    assert sorted(p.name for p in nearly_full_export_folder.iterdir()) == sorted(
        ["model_state.pt", "model.ts", "model.pt2", "model.json"]
    )


def test_staged_outputs_appear_together_and_only_on_success(tmp_path):
    a, b = tmp_path / "x/a.txt", tmp_path / "y/b.txt"
    with pytest.raises(RuntimeError), staged(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
        assert ta.name == "a.txt" and ta.parent.name.endswith(".tmp")  # the final name: logged artifacts keep it
        raise RuntimeError("something after writing failed")
    assert not a.exists() and not b.exists()
    with staged(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "x", "y"]


def test_a_rename_that_fails_puts_back_the_outputs_already_replaced(tmp_path):
    """All new or all old: never a new metrics file beside an old model."""
    a, b = tmp_path / "x/a.txt", tmp_path / "y/b.txt"
    for f, text in ((a, "old a"), (b, "old b")):
        f.parent.mkdir()
        f.write_text(text)
    with immutable(b), pytest.raises(OutputError) as exc, staged(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert str(exc.value).startswith(f"cannot write {b}: Operation not permitted; make the file and its folder")
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "x", "y"]


# -- 7. Broken inputs: one line naming the file and how to get it back -------------------------------


def break_file(path: Path, how: str, tmp_path: Path) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    elif how == "json":
        path.write_text('{"classes": [')
    elif how == "pickle":  # a real torch.save file whose pickle calls os.system
        torch.save({"conv.weight": Payload(tmp_path / "payload-ran")}, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "file", "made_by", "how", "expected"),
    [
        ("train", "data/prepared/train-images.npy", "prepare", "truncate", "is unreadable (corrupt or truncated: "),
        ("evaluate", "models/train/best.pt", "train", "random", "is unreadable (corrupt or truncated: "),
        ("build", "data/prepared/manifest.json", "prepare", "json", "is unreadable (not valid JSON: "),
        ("train", "models/build/init.pt", "build", "pickle", "is unreadable (it holds objects other than tensors"),
    ],
)
def test_a_broken_input_file_is_one_line_with_exit_code_4(trained, tmp_path, stage, file, made_by, how, expected):
    break_file(trained / file, how, tmp_path)
    before = snapshot(trained)
    proc = python("-m", "tasks", stage, cwd=trained)
    line = one_line_error(proc)
    assert proc.returncode == 4
    assert line.startswith(f"error: {stage}: {file} {expected}")
    assert line.endswith(
        f"restore it with `dvc checkout {file}`, or make it again with `dvc repro` (stage '{made_by}')"
    )
    assert snapshot(trained) == before
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.slow
def test_overriding_the_architecture_for_train_alone_is_one_line(trained):
    before = snapshot(trained)
    proc = python("-m", "tasks", "train", "--set", "build.model=mlp", cwd=trained)
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert line.startswith(
        "error: train: models/build/init.pt does not fit the model that params describe (build.model=mlp;"
    )
    assert line.endswith("make it again with `dvc repro build`, or do not override build.* for this stage alone")
    assert snapshot(trained) == before


# -- 4 and 7. The tracking store: deleted, unwritable, unreachable -----------------------------------


@pytest.mark.slow
def test_a_deleted_store_is_not_recreated_and_the_message_says_how_to_recover(trained, tmp_path):
    db = tmp_path / "mlflow.db"
    db.unlink()
    before = snapshot(trained)
    proc = python("-m", "tasks", "evaluate", cwd=trained)
    assert proc.returncode == 7
    assert one_line_error(proc) == (
        f"error: evaluate: MLflow store sqlite:///{db} does not exist ({db} was deleted or moved?), so the run of "
        "the current model is not there; train again to log a new run: dvc repro --force --downstream train"
    )
    assert not db.exists() and snapshot(trained) == before
    # The command in the message recovers: a new run with every step logged.
    from tests.conftest import dvc

    dvc("repro", "--force", "--downstream", "train", cwd=trained)
    (run,) = runs()
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
    assert {m.path for m in tracking.client().list_artifacts(run.info.run_id, "export")} == {
        "export/model.pt2",
        "export/model.json",
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "evaluate", "export"])
def test_an_unwritable_store_is_one_line_and_changes_nothing(trained, tmp_path, stage):
    """evaluate and export find their run (reading works) and fail when they log: after writing, before replacing."""
    before = snapshot(trained)
    with immutable(tmp_path / "mlflow.db"):
        proc = python("-m", "tasks", stage, cwd=trained)
    assert proc.returncode == 7
    line = one_line_error(proc)
    assert line.startswith(f"error: {stage}: MLflow store sqlite:///{tmp_path / 'mlflow.db'}: ")
    assert "readonly database; make the file and its folder writable" in line
    assert snapshot(trained) == before and not leftovers(trained)


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["newer", "older"])
def test_a_store_of_another_mlflow_version_says_which_and_what_to_do(trained, tmp_path, made_by):
    """A store shared with an environment that has another MLflow: MLflow says "out-of-date" and "upgrade" for
    both, which cannot work on a newer store; the line says which it is, and the fix for that."""
    import sqlite3

    import mlflow

    db = tmp_path / "mlflow.db"
    # A revision this MLflow has never heard of (a newer MLflow's), or one of its own older ones.
    versions = sorted((Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions").glob("*_*.py"))
    revision = "f4a9b2c7d1e6" if made_by == "newer" else versions[0].name.split("_")[0]
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    before = snapshot(trained)
    proc = python("-m", "tasks", "evaluate", cwd=trained)
    assert proc.returncode == 7
    line = one_line_error(proc)
    assert line.startswith(f"error: evaluate: MLflow store sqlite:///{db}: its database schema ({revision}) is ")
    assert line.endswith(", or point MLFLOW_TRACKING_URI at another store")
    if made_by == "newer":
        assert f"newer than this MLflow ({mlflow.__version__}) knows" in line and "use that MLflow version" in line
        assert "upgrade" not in line  # MLflow's own advice, which fails on a newer store
    else:
        assert f"from an older MLflow than this one ({mlflow.__version__}" in line
        assert f"back it up, then upgrade it: mlflow db upgrade sqlite:///{db}" in line
    assert snapshot(trained) == before and not leftovers(trained)
    # The MLflow UI script says the same, instead of printing a link and then MLflow's traceback.
    env = {**os.environ, "VENV": sys.prefix}
    ui = sh("bash", "scripts/mlflow-ui.sh", "--port", str(free_port()), cwd=trained, env=env, check=False)
    assert ui.returncode == 7 and ui.stdout == ""
    assert ui.stderr.strip() == line.replace("error: evaluate: ", "error: ")


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_fast(trained):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    started = time.monotonic()
    proc = python("-m", "tasks", "train", cwd=trained, env=env)
    assert proc.returncode == 7 and time.monotonic() - started < 60  # not MLflow's minutes of retries
    assert one_line_error(proc).startswith("error: train: MLflow tracking server http://127.0.0.1:9 does not answer")


# -- 5. Kills and interrupts ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_an_interrupt_exits_cleanly_and_marks_the_run_killed(trained, sig, code, said):
    before = snapshot(trained)
    proc = start("-m", "tasks", "train", "--set", "train.epochs=500", cwd=trained)
    wait_for(proc, "epoch   2/500")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "Traceback" not in out
    killed = runs()[-1]
    assert killed.info.status == "KILLED"
    assert out.strip().splitlines()[-1] == (
        f"error: train: {said}: the running step left its previous outputs as they were; "
        f"MLflow run {killed.info.run_id} marked KILLED"
    )
    assert snapshot(trained) == before and not leftovers(trained)


@pytest.mark.slow
def test_a_run_left_running_by_sigkill_is_closed_by_the_next_run(trained):
    before = snapshot(trained)
    proc = start("-m", "tasks", "train", "--set", "train.epochs=500", cwd=trained)
    wait_for(proc, "epoch   2/500")
    identity = process_id(proc.pid)  # pid and start time
    proc.kill()
    proc.wait()
    (orphan,) = runs("RUNNING")
    assert orphan.data.tags["pipeline.pid"] == identity
    assert snapshot(trained) == before

    again = python("-m", "tasks", "train", cwd=trained, check=True)
    assert f"closed MLflow run {orphan.info.run_id} as KILLED" in again.stdout
    closed = tracking.client().get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED" and "killed" in closed.data.tags["pipeline.closed"]
    assert runs("RUNNING") == [] and runs()[-1].info.status == "FINISHED"
    assert not leftovers(trained)


# -- 6. One checkout, one run at a time --------------------------------------------------------------


@pytest.mark.slow
def test_a_stage_run_by_hand_is_refused_while_dvc_holds_the_checkout(trained):
    from dvc.repo import Repo

    before = snapshot(trained)
    repo = Repo(str(trained))
    with repo.lock:  # what a running `dvc repro` or pipeline flow holds
        proc = python("-m", "tasks", "train", cwd=trained)
    repo.close()
    assert proc.returncode == 8
    assert one_line_error(proc) == (
        "error: train: another process is working in this checkout (a `dvc repro`, a pipeline flow or a stage "
        "holds DVC's lock, .dvc/tmp/lock); wait for it to finish, then run again"
    )
    assert snapshot(trained) == before and runs("RUNNING") == []
    assert len(runs()) == 1  # no MLflow run was even opened


def test_missing_stage_input_is_one_line(trained):
    (trained / "models/train/best.pt").unlink()
    with pytest.raises(InputError, match=r"^models/train/best.pt is missing: run the 'train' stage first"):
        export.run(load())


def test_prepare_and_build_write_nothing_when_they_fail_midway(trained, monkeypatch):
    before = snapshot(trained)
    monkeypatch.setattr(prepare, "json_text", lambda obj: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare.run(load())
    monkeypatch.setattr(build, "json_text", lambda obj: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build.run(load())
    assert snapshot(trained) == before and not leftovers(trained)
