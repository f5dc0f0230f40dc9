"""The step functions themselves, on the real digits data, in a throwaway copy of the project."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import build, checker, evaluate, export, inputs, paths, prepare, tracking, train
from tasks.core.models import build_optimizer
from tasks.errors import DataError
from tasks.files import read_json, sha256_file
from tasks.params import load
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parents[1]


def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(paths.images(split)), np.load(paths.labels(split))


def test_prepare_splits_stratified_disjoint_and_seeded(project):
    params = load()
    prepare.run(params)
    manifest = read_json(paths.MANIFEST, "prepare")
    x = {s: arrays(s)[0] for s in paths.SPLITS}

    assert manifest["sizes"] == {"train": 1257, "val": 270, "test": 270}
    assert x["train"].dtype == np.uint8 and list(x["train"].shape[1:]) == [1, 8, 8] == manifest["input_shape"]
    # Stratified: every class has its share (about 15 %) of the test split, give or take one image.
    totals = {c: sum(manifest["counts"][s][c] for s in paths.SPLITS) for c in manifest["classes"]}
    for c, n in manifest["counts"]["test"].items():
        assert abs(n - 0.15 * totals[c]) <= 1
    # Disjoint: no image appears in two splits (digits has no exact duplicates across these).
    rows = {s: {bytes(image) for image in x[s]} for s in paths.SPLITS}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"] and not rows["train"] & rows["val"]
    # Normalisation statistics come from the train split alone.
    train_scaled = torch.from_numpy(x["train"]).double() / 16
    assert manifest["normalisation"]["mean"][0] == pytest.approx(train_scaled.mean().item(), abs=1e-7)
    assert manifest["normalisation"]["std"][0] == pytest.approx(train_scaled.std().item(), abs=1e-7)

    first = manifest["sha256"]
    prepare.run(params)
    assert read_json(paths.MANIFEST, "prepare")["sha256"] == first
    prepare.run(load(overrides=["seed=7"]))
    assert read_json(paths.MANIFEST, "prepare")["sha256"]["test-labels.npy"] != first["test-labels.npy"]


def test_prepare_of_arrays_does_not_import_torch(project):
    """`dvc repro prepare` on the digits in a process without torch (1.2-1.8 s less); a resize still works."""
    proc, imported = run_module("tasks", ["prepare"], cwd=project, env={**os.environ, "DVC_STAGE": "prepare"})
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in imported and "sklearn" in imported  # it did load the digits
    assert read_json(paths.MANIFEST, "prepare")["input_shape"] == [1, 8, 8]

    prepare.run(load(overrides=["prepare.image_size=12"]))  # resized: torch imported where it is needed
    assert read_json(paths.MANIFEST, "prepare")["input_shape"] == [1, 12, 12]
    assert arrays("train")[0].shape[1:] == (1, 12, 12)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_build_makes_a_seeded_model_that_takes_raw_pixels(project, model):
    params = load(overrides=[f"build.model={model}"])
    prepare.run(params)
    summary = build.run(params)
    net = inputs.model(params, paths.INIT, made_by="build")
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())
    assert net(torch.full((4, 1, 8, 8), 16.0)).shape == (4, 10)
    # Raw pixels are standardised inside the model: train images come out with mean 0, std 1.
    z = net[0](torch.from_numpy(arrays("train")[0]).float())
    assert z.mean().item() == pytest.approx(0, abs=1e-4) and z.std().item() == pytest.approx(1, abs=1e-3)
    before = sha256_file(paths.INIT)
    build.run(params)
    assert sha256_file(paths.INIT) == before


@pytest.mark.parametrize(
    ("shape", "channels"), [((1, 8, 8), [32, 64]), ((3, 32, 32), [16, 32]), ((3, 64, 48), [16, 32, 64])]
)
def test_the_cnn_adapts_to_channels_and_image_size(shape, channels):
    from tasks.core.models import build_model

    norm = {"scale": 1 / 255, "mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    net = build_model("cnn", list(shape), 5, norm, channels=channels, hidden=[8], dropout=0.0)
    assert net(torch.zeros(2, *shape)).shape == (2, 5)
    # The classifier sees at most 4x4 positions per channel, whatever the image size.
    assert net[1][-1].in_features <= channels[-1] * 16


def test_a_split_too_small_for_every_class_is_a_data_error(project):
    with pytest.raises(DataError, match="cannot split 1797 images stratified"):
        prepare.run(load(overrides=["prepare.test_fraction=0.004"]))
    assert not paths.MANIFEST.exists()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_are_built_with_their_hyperparameters(optimizer):
    params = load(
        ROOT / "params.yaml", overrides=[f"train.optimizer={optimizer}", "train.lr=0.02", "train.weight_decay=0.001"]
    )
    cfg = params.train
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["weight_decay"] == 0.001
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[optimizer]
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == params.train.momentum


def test_training_learns_and_is_byte_reproducible(project):
    params = load()
    prepare.run(params)
    build.run(params)
    first = train.run(params)
    weights = sha256_file(paths.BEST)
    metrics = read_json(paths.TRAIN_METRICS, "train")
    assert metrics["val"]["accuracy"] > 0.85  # 3 epochs are plenty to learn digits
    assert 1 <= metrics["best_epoch"] <= 3

    second = train.run(params)
    assert sha256_file(paths.BEST) == weights
    assert second["run_id"] != first["run_id"]  # a new MLflow run per training

    train.run(load(overrides=["seed=1"]))
    assert sha256_file(paths.BEST) != weights


def test_curves_have_one_row_per_epoch(project):
    params = load()
    prepare.run(params)
    build.run(params)
    train.run(params)
    lines = paths.TRAIN_CURVES.read_text().splitlines()
    assert lines[0] == "epoch,train/loss,val/loss,val/accuracy"
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_export_that_does_not_match_keeps_the_previous_files(project, monkeypatch):
    params = load()
    for step in (prepare, build, train, evaluate, export):
        step.run(params)
    files = paths.OUTPUTS["export"]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, sha256_file(p)) for p in files}
    assert read_json(paths.EXPORT_INFO, "export")["check"]["max_abs_diff"] == {"torchscript": 0.0, "torch_export": 0.0}

    monkeypatch.setattr(export, "check_in_fresh_process", lambda *a: {"torchscript": 0.0, "torch_export": 0.5})
    with pytest.raises(export.ExportError, match="torch_export"):
        export.run(params)
    # Not rewritten at all: same inode, same modification time, same bytes.
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns, sha256_file(p)) for p in files} == before
    assert not [p for p in paths.EXPORT_INFO.parent.iterdir() if ".tmp" in p.name]
    assert checker._ahead is None  # nor is the check's process, started ahead and not used, left waiting
    # Nor was anything logged: the two models of the first export are all there is.
    c = tracking.client()
    logged = c.search_logged_models([c.get_experiment_by_name("pipeline").experiment_id])
    assert sorted(m.name for m in logged) == ["model", "torchscript"]


@pytest.mark.slow  # every step, two exports: 12 s
def test_training_again_after_a_failed_export_goes_on_in_its_run(project, monkeypatch):
    """A retrained model whose export failed: the next train resumes that run, which holds models already."""
    params = load()
    for step in (prepare, build, train, evaluate, export):
        step.run(params)
    train.run(params)  # the same weights: a new run, given the first run's test metrics and models
    second = tracking.current_run_id(paths.BEST)
    with monkeypatch.context() as m, pytest.raises(export.ExportError):
        m.setattr(export, "check_in_fresh_process", lambda *a: {"torchscript": 0.0, "torch_export": 0.5})
        export.run(params)  # the run ends FAILED, after its training finished
    train.run(params)  # resumes that run to write its outputs (it was a TrackingError: UNIQUE constraint failed)
    run = tracking.client().get_run(second)
    assert tracking.current_run_id(paths.BEST) == second and run.info.status == "FINISHED"
    assert sorted(tracking.client().get_logged_model(m.model_id).name for m in run.outputs.model_outputs) == [
        "model",
        "torchscript",
    ]
    export.run(params)  # and the pipeline goes on


def test_a_data_set_that_another_run_inserted_meanwhile_is_logged_on_a_second_try(project, monkeypatch):
    """A sweep's trials log the same new data set at once: the store keeps one insert, the other run tries again."""
    from mlflow.exceptions import MlflowException

    params = load()
    for step in (prepare, build, train):
        step.run(params)
    run_id = tracking.current_run_id(paths.BEST)
    c = tracking.client()
    real, calls = type(c).log_inputs, []

    def racing(self, run, datasets=None, models=None, error="UNIQUE constraint failed: datasets.experiment_id"):
        calls.append(run)
        if len(calls) == 1:
            raise MlflowException(f"(sqlite3.IntegrityError) {error}, datasets.name, datasets.digest")
        return real(self, run, datasets=datasets, models=models)

    monkeypatch.setattr(type(c), "log_inputs", racing)
    record = inputs.split_record("test")
    tracking.log_datasets(run_id, [record])
    assert len(calls) == 2 and record["name"] in {d.dataset.name for d in c.get_run(run_id).inputs.dataset_inputs}

    calls.clear()  # any other failure is not retried: one line naming the store
    monkeypatch.setattr(type(c), "log_inputs", lambda self, run, **kw: racing(self, run, error="disk I/O error", **kw))
    with pytest.raises(tracking.TrackingError, match="disk I/O error"):
        tracking.log_datasets(run_id, [record])
    assert len(calls) == 1


def test_the_export_check_uses_the_fresh_process_started_ahead(tmp_path):
    """The files are loaded in the process started ahead, or else in a new one; an unused one is stopped."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(4, 1, 4, 4)
    ts, pt2 = tmp_path / "model.ts", tmp_path / "model.pt2"
    torch.jit.save(torch.jit.script(model), ts)
    torch.export.save(torch.export.export(model, (x,)), pt2)
    with torch.no_grad():
        expected = model(x)
    checker.start_ahead()
    ahead = checker._ahead
    assert export.check_in_fresh_process(x, expected, ts, pt2) == {"torchscript": 0.0, "torch_export": 0.0}
    assert ahead.returncode == 0 and checker._ahead is None  # that process did the check, and is gone
    off = export.check_in_fresh_process(x, expected + 1, ts, pt2)  # none waiting: one is started for it
    assert off == pytest.approx({"torchscript": 1.0, "torch_export": 1.0})
    checker.start_ahead()
    unused = checker._ahead
    checker.stop_ahead()
    assert unused.poll() is not None and checker._ahead is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(train.TrainingError, match="no CUDA device"):
        train.pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(project):
    params = load(overrides=["train.device=cuda", "train.epochs=1"])
    prepare.run(params)
    build.run(params)
    assert train.run(params)["best_epoch"] == 1
    assert np.isfinite(read_json(paths.TRAIN_METRICS, "train")["val"]["loss"])
