"""Checkpoints, resuming and the training recipe, on the real train step with a real MLflow store.

An interruption is a KeyboardInterrupt raised from inside the loop (what Ctrl-C does), or a crash;
the kills from outside (SIGKILL, SIGINT to `dvc repro`) are in tests/test_dvc.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tasks import build, paths, prepare, train
from tasks.core import checkpoint
from tasks.core.loops import WARMUP_START, build_schedule
from tasks.files import sha256_file
from tasks.params import ConfigError, load
from tasks.tracking import client


@pytest.fixture
def built(project):
    """The project with prepare and build done (4 epochs of training to come)."""
    params = load(overrides=["train.epochs=4"])
    prepare.run(params)
    build.run(params)
    return project


def runs():
    c = client()
    experiment = c.get_experiment_by_name("pipeline")
    return c.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []


def epochs_logged(run_id: str, key: str = "val/accuracy") -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


def interrupt_at(monkeypatch, epoch: int, error: BaseException) -> None:
    """Raise `error` in the validation of `epoch`, once: a crash in the middle of training."""
    real = train.validate
    calls = {"n": 0}

    def validate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "validate", validate)


def test_an_interrupted_training_resumes_in_the_same_run_with_the_same_weights(built, monkeypatch, capsys):
    params = load(overrides=["train.epochs=4"])
    train.run(params)
    uninterrupted = sha256_file(paths.BEST)

    with monkeypatch.context() as mp:
        interrupt_at(mp, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            train.run(params)
    killed = runs()[-1]
    assert killed.info.status == "KILLED"
    assert epochs_logged(killed.info.run_id) == [1, 2]
    names = sorted(p.name for p in paths.CHECKPOINTS.iterdir())
    assert [n.split("-")[3] for n in names] == ["0001", "0002"]  # keep: 2, and the epoch-3 one never written

    capsys.readouterr()
    train.run(params)
    out = capsys.readouterr().out
    assert f"resuming MLflow run {killed.info.run_id}" in out and "(epoch 2 done)" in out
    assert sha256_file(paths.BEST) == uninterrupted
    after = runs()
    assert [r.info.run_id for r in after][-1] == killed.info.run_id and len(after) == 2
    assert after[-1].info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/accuracy", "train/lr"):
        assert epochs_logged(killed.info.run_id, key) == [1, 2, 3, 4], key
    assert json.loads(paths.TRAIN_METRICS.read_text())["epochs"] == 4


def test_a_checkpoint_holds_plain_values_and_tensors_only(built):
    train.run(load(overrides=["train.epochs=2"]))
    newest = sorted(paths.CHECKPOINTS.iterdir())[-1]
    state = torch.load(newest, weights_only=True)  # raises on any pickled object
    assert state["done"] is True and state["loop"]["epoch"] == 2 and state["steps"] == 2 * 20
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "loop", "key", "inputs"}
    assert {"torch", "cuda", "python", "numpy"} <= set(state["rng"][0])
    assert state["inputs"]["train.lr"] == 0.003 and len(state["inputs"]["data.sha256"]) == 64


@pytest.mark.parametrize("background", [False, True])
def test_checkpoints_reach_the_disk_once_a_second_and_the_last_flushed_one_is_kept(tmp_path, monkeypatch, background):
    """A machine crash can lose only what was not flushed: the newest flushed checkpoint stays until a newer one is."""
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        checkpoint.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    writer = checkpoint.Writer(background=background, sync_every=3600)
    for epoch in range(1, 5):
        writer.save(
            tmp_path,
            {"format": checkpoint.FORMAT, "epoch": epoch, "w": torch.full((3,), float(epoch))},
            epoch * 10,
            epoch,
            keep=2,
        )
    writer.wait()
    names = sorted(p.name.split("-")[3] for p in tmp_path.iterdir())
    assert names == ["0001", "0003", "0004"]  # the newest two, and epoch 1's, the only one flushed
    assert [Path(f).name.split("-")[3] for f in flushed if f.endswith(".tmp")] == ["0001"]
    writer.save(
        tmp_path, {"format": checkpoint.FORMAT, "epoch": 5, "w": torch.full((3,), 5.0)}, 50, 5, keep=2, last=True
    )
    writer.wait()
    assert sorted(p.name.split("-")[3] for p in tmp_path.iterdir()) == ["0004", "0005"]
    state, path = checkpoint.load_latest(tmp_path, warn=pytest.fail)
    assert state["epoch"] == 5 and torch.equal(state["w"], torch.full((3,), 5.0))
    assert [Path(f).name.split("-")[3] for f in flushed if f.endswith(".tmp")] == ["0001", "0005"]
    assert flushed.count(str(tmp_path)) == 2  # and the folder's entries each time


@pytest.mark.slow
def test_a_corrupt_last_checkpoint_is_named_and_the_one_before_is_used(built, monkeypatch, capsys):
    params = load(overrides=["train.epochs=4", "train.checkpoint.keep=3"])
    train.run(params)
    uninterrupted = sha256_file(paths.BEST)
    with monkeypatch.context() as mp:
        interrupt_at(mp, 4, RuntimeError("out of memory"))
        with pytest.raises(RuntimeError):
            train.run(params)
    assert runs()[-1].info.status == "FAILED"
    last = sorted(paths.CHECKPOINTS.iterdir())[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit of a tensor: still a valid zip, but not what was written
    last.write_bytes(bytes(data))

    capsys.readouterr()
    train.run(params)
    out = capsys.readouterr().out
    assert f"warning: checkpoint {last} is unusable (its content does not match the sha256 in its name" in out
    assert "(epoch 2 done)" in out
    assert sha256_file(paths.BEST) == uninterrupted
    assert epochs_logged(runs()[-1].info.run_id) == [1, 2, 3, 4]

    for path in paths.CHECKPOINTS.iterdir():  # every one cut short: a fresh start, not a crash
        path.write_bytes(path.read_bytes()[:100])
    with monkeypatch.context() as mp:
        interrupt_at(mp, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            train.run(params)
    assert "trying the one before it" in capsys.readouterr().out


def test_a_new_training_that_crashes_before_its_first_checkpoint_trains_when_run_again(built, monkeypatch, capsys):
    """The old finished checkpoint stays (a failure changes no output), but is not passed off as the new run's."""
    params = load(overrides=["train.epochs=4"])
    train.run(params)
    old = sorted(paths.CHECKPOINTS.iterdir())
    paths.BEST.unlink()  # train is stale again with the same inputs (as after a `--force`)
    with monkeypatch.context() as mp:
        interrupt_at(mp, 1, RuntimeError("out of memory (simulated)"))
        with pytest.raises(RuntimeError):
            train.run(params)
    assert sorted(paths.CHECKPOINTS.iterdir()) == old  # no checkpoint written yet: the old ones are kept
    crashed = runs()[-1]
    assert crashed.info.status == "FAILED"

    capsys.readouterr()
    train.run(params)
    out = capsys.readouterr().out
    assert "ends a finished training; training again from epoch 1" in out
    assert "epoch   1/4" in out and "resuming" not in out
    last = runs()[-1]
    assert last.info.status == "FINISHED" and last.info.run_id != crashed.info.run_id
    assert epochs_logged(last.info.run_id) == [1, 2, 3, 4]


def test_draws_from_pythons_generator_by_other_libraries_do_not_change_the_checkpoints(built, monkeypatch):
    """Under Prefect, a websockets thread draws from `random` for its pings: the checkpoints (and dvc.lock) stay."""
    import random
    import shutil

    params = load(overrides=["train.epochs=2"])
    train.run(params)
    quiet = sorted(p.name for p in paths.CHECKPOINTS.iterdir())
    shutil.rmtree(paths.CHECKPOINTS)
    real = train.validate

    def validate(*args, **kwargs):
        random.random(), random.getrandbits(32)  # another library, in the middle of training
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "validate", validate)
    train.run(params)
    assert sorted(p.name for p in paths.CHECKPOINTS.iterdir()) == quiet  # their names hold their sha256


def test_a_changed_param_starts_afresh_and_says_which(built, monkeypatch, capsys):
    params = load(overrides=["train.epochs=4"])
    with monkeypatch.context() as mp:
        interrupt_at(mp, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            train.run(params)
    capsys.readouterr()
    train.run(load(overrides=["train.epochs=4", "train.lr=0.002", "train.checkpoint.keep=5", "train.num_workers=1"]))
    out = capsys.readouterr().out
    # Only the param that changes the weights is named; checkpoint and worker settings may change.
    assert "starting at epoch 1, not from step-000000040-epoch-0002-" in out
    assert "made with other inputs (train.lr 0.003 -> 0.002)" in out
    first, second = runs()
    assert first.info.status == "KILLED" and second.info.status == "FINISHED"
    assert epochs_logged(second.info.run_id) == [1, 2, 3, 4]


@pytest.mark.slow
def test_resuming_from_the_middle_of_an_epoch_gives_the_same_weights(built, monkeypatch, capsys):
    params = load(overrides=["train.epochs=3", "train.checkpoint.every_steps=7", "train.augment.rotation=10"])
    train.run(params)
    uninterrupted = sha256_file(paths.BEST)
    real = checkpoint.place
    calls = {"n": 0}

    def save_then_die(*args):
        path = real(*args)
        calls["n"] += 1
        if calls["n"] == 4:  # steps 7, 14, the end of epoch 1 (20), then step 21: one batch into epoch 2
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "place", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train.run(params)
    capsys.readouterr()
    train.run(params)
    out = capsys.readouterr().out
    assert "from models/train/checkpoints/step-000000021-epoch-0001-" in out
    assert sha256_file(paths.BEST) == uninterrupted
    assert epochs_logged(runs()[-1].info.run_id) == [1, 2, 3]


@pytest.mark.parametrize(
    ("patience", "min_delta", "accuracies", "stop_epoch", "best_epoch"),
    [
        (2, 0.0, [0.5, 0.6, 0.6, 0.6, 0.9, 0.9], 4, 2),
        (2, 0.01, [0.5, 0.6, 0.605, 0.61, 0.9, 0.9], 4, 4),  # better, but not by more than min_delta
        pytest.param(0, 0.0, [0.5, 0.6, 0.6, 0.6, 0.6, 0.6], 6, 2, marks=pytest.mark.slow),  # patience 0: off
    ],
)
def test_early_stopping_ends_at_the_right_epoch(
    built, monkeypatch, patience, min_delta, accuracies, stop_epoch, best_epoch
):
    scripted = iter(accuracies)
    monkeypatch.setattr(train, "validate", lambda *a, **k: {"loss": 0.5, "accuracy": next(scripted)})
    params = load(
        overrides=[
            "train.epochs=6",
            f"train.early_stopping.patience={patience}",
            f"train.early_stopping.min_delta={min_delta}",
        ]
    )
    train.run(params)
    metrics = json.loads(paths.TRAIN_METRICS.read_text())
    assert (metrics["epochs"], metrics["best_epoch"]) == (stop_epoch, best_epoch)
    assert epochs_logged(runs()[-1].info.run_id) == list(range(1, stop_epoch + 1))
    assert len(paths.TRAIN_CURVES.read_text().splitlines()) == stop_epoch + 1


def lrs(name: str, steps: list[int], **kwargs) -> list[float]:
    """The learning rate in effect for each of `steps` (0 = the first optimizer step) of a 10-epoch run."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler, plateau = build_schedule(optimizer, name, 1.0, epochs=10, steps_per_epoch=10, **kwargs)
    seen = []
    for _ in range(max(steps) + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler:
            scheduler.step()
    return [seen[s] for s in steps]


def test_each_schedule_sets_the_learning_rate_at_chosen_steps():
    approx = pytest.approx
    assert lrs("constant", [0, 50, 99]) == [1.0, 1.0, 1.0]
    assert lrs("step", [0, 29, 30, 60, 99], step_epochs=3, gamma=0.5) == approx([1, 1, 0.5, 0.25, 0.5**3])
    assert lrs("cosine", [0, 50, 99], min_lr=0.0) == approx([1.0, 0.5, 0.000247], abs=1e-5)
    one = lrs("onecycle", [0, 30, 99])
    assert one[0] == approx(1.0 / 25) and one[1] == approx(1.0, abs=1e-3) and one[2] < 1e-3  # peak at 30 %
    warm = lrs("cosine", [0, 10, 20, 99], warmup_epochs=2, min_lr=0.1)
    assert warm[0] == approx(WARMUP_START) and WARMUP_START < warm[1] < 1.0 and warm[2] == approx(1.0)
    assert warm[3] == approx(0.1, abs=1e-3)


def test_plateau_lowers_the_rate_after_patience_epochs_without_improvement():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _, plateau = build_schedule(optimizer, "plateau", 1.0, 10, 10, gamma=0.5, patience=1, maximize=True)
    for accuracy in (0.5, 0.6, 0.6):
        plateau.step(accuracy)
    assert optimizer.param_groups[0]["lr"] == 1.0
    plateau.step(0.6)  # a second epoch without improvement: more than patience 1
    assert optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.slow
def test_the_recipe_trains_and_stays_reproducible(built):
    overrides = [
        "train.epochs=3", "train.schedule.name=cosine", "train.schedule.warmup_epochs=0.5", "train.accumulate=3",
        "train.clip_grad_norm=1.0", "train.decay_norms_and_biases=false", "train.precision=bf16",
        "train.channels_last=true", "train.augment.crop_scale=0.8",
    ]  # fmt: skip
    params = load(overrides=overrides)
    train.run(params)
    first = sha256_file(paths.BEST)
    metrics = json.loads(paths.TRAIN_METRICS.read_text())
    assert metrics["val"]["accuracy"] > 0.5
    lr_history = [m.value for m in client().get_metric_history(runs()[-1].info.run_id, "train/lr")]
    assert lr_history[0] > lr_history[-1]  # cosine went down
    paths.BEST.unlink()
    train.run(params)  # a finished training: it trains again, and gets the same bytes
    assert sha256_file(paths.BEST) == first


def test_fp16_without_cuda_and_impossible_schedules_are_refused(built):
    if not torch.cuda.is_available():
        with pytest.raises(train.TrainingError, match="fp16 needs CUDA"):
            train.run(load(overrides=["train.precision=fp16", "train.epochs=1"]))
    with pytest.raises(ConfigError, match="onecycle warms up by itself"):
        load(overrides=["train.schedule.name=onecycle", "train.schedule.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="warmup_epochs .* must be below epochs"):
        load(overrides=["train.schedule.warmup_epochs=40"])


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_and_a_pipe_one_line_per_epoch(built):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "tasks", "train", "--set", "train.epochs=2"]
    piped = subprocess.run(args, cwd=built, env=env, capture_output=True, text=True, check=True)
    lines = [line[:11] for line in piped.stdout.splitlines() if line.startswith("epoch")]
    assert lines == ["epoch   1/2", "epoch   2/2"]
    assert "img/s" not in piped.stdout + piped.stderr  # no bar in a log

    terminal, their_end = pty.openpty()
    fcntl.ioctl(their_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, as a window
    proc = subprocess.Popen(args, cwd=built, env=env, stdout=subprocess.PIPE, stderr=their_end)
    os.close(their_end)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(terminal)
    assert proc.returncode == 0
    assert b"epoch 1/2" in shown and b"img/s" in shown  # the bar, on the terminal (stderr)
    assert out.decode().count("\nepoch ") + out.decode().startswith("epoch") == 2  # and the lines on stdout


@pytest.mark.slow
def test_a_compiled_model_trains_and_saves_the_plain_models_weights(built):
    train.run(load(overrides=["train.epochs=2", "train.compile=true"]))  # the first epoch compiles: about a minute
    state = torch.load(paths.BEST, weights_only=True)
    assert not [k for k in state if k.startswith("_orig_mod")]  # loads into the model that export builds
    assert json.loads(paths.TRAIN_METRICS.read_text())["val"]["accuracy"] > 0.5
