"""train: the classic loop, validated every epoch, keeping the best epoch's weights.

    python -m tasks train            # or: dvc repro train

Per epoch: `model.train()`, shuffled batches through `zero_grad` / forward / loss /
`backward` / `step` (`tasks/core/loops.py` `train_one_epoch`), then validation with
`model.eval()` under `torch.no_grad()` (`evaluate`, the same function that tests the model).
Batches come from the memory-mapped arrays of `prepare` through a `DataLoader`
(`train.num_workers` processes, pinned memory on CUDA), with `train.augment` applied per sample
on the train split only. The weights of the epoch with the best `train.select_metric` are kept
in `models/train/best.pt`. Runs on CPU, or on CUDA when present (`train.device: auto`).

A quality gate stops a run that is going nowhere, with one line naming the epoch, the value and
the param most likely at fault, before it can replace a good model: a train loss above
`train.divergence_factor` times the untrained model's loss (or not finite), or, from epoch
`train.chance_epochs` on, a selection metric no better than chance. Outputs are written only
after training and its MLflow logging succeeded, so a stopped, failed or killed run leaves the
previous ones as they were; Ctrl-C marks the MLflow run KILLED.

Same seed, same params, same machine: byte-identical weights. The seed fixes the initial
weights (from `build`), the shuffling (a dedicated generator), augmentation and dropout, and
`torch.use_deterministic_algorithms` rules out nondeterministic kernels.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch

from tasks import BY_HAND, StepContext, inputs, paths, tracking
from tasks.core.data import augmentation, loader
from tasks.core.loops import evaluate, train_one_epoch
from tasks.core.models import build_loss, build_optimizer
from tasks.errors import PipelineError, TrainingError
from tasks.files import json_text, require, save_torch, sha256_file, staged
from tasks.params import Params

CURVE_KEYS = ("train/loss", "val/loss", "val/accuracy")
DATA_ARTIFACTS = (paths.MANIFEST, paths.DATA_REPORT, paths.DATA_COUNTS, paths.DATA_SIZES, paths.DATA_SAMPLES)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric.endswith("accuracy") else value < best


def chance_level(metric: str, val_y: torch.Tensor, n_classes: int) -> float:
    """What a model that learned nothing scores: always the most common class, or uniform probabilities."""
    if metric.endswith("accuracy"):
        return torch.bincount(val_y, minlength=n_classes).max().item() / val_y.numel()
    return math.log(n_classes)  # cross-entropy of uniform predictions, with or without label smoothing


def at_chance(metric: str, value: float, chance: float) -> bool:
    return value <= chance + 1e-9 if metric.endswith("accuracy") else value >= chance - 1e-9


def suspect(params: Params, first_loss: float, last_loss: float, n_classes: int) -> str:
    """The param most likely at fault when training goes nowhere, with what to do about it."""
    cfg = params.train
    if not math.isfinite(first_loss):
        return (
            f"the untrained model's loss is already {first_loss}, before any step: look for non-finite values "
            "in the data (stage 'prepare') or the initial weights (stage 'build')"
        )
    shrink = cfg.lr * cfg.weight_decay
    if shrink >= 0.1:
        return (
            f"most likely train.weight_decay (now {cfg.weight_decay:g}): with train.lr {cfg.lr:g} it pulls the "
            f"weights {shrink:.3g} of the way to zero every step; lower it"
        )
    lower_lr = f"most likely train.lr (now {cfg.lr:g}): lower it, e.g. --set train.lr={cfg.lr / 10:g}"
    guessing = math.log(n_classes)  # the loss of a model that learned nothing
    if not math.isfinite(last_loss) or last_loss > 1.5 * max(first_loss, guessing):
        return lower_lr
    if last_loss >= 0.8 * guessing:  # the loss stayed where guessing puts it: nothing was learned
        if cfg.label_smoothing >= 0.8:
            return f"most likely train.label_smoothing (now {cfg.label_smoothing:g}): lower it"
        if params.build.dropout >= 0.8:
            return f"most likely build.dropout (now {params.build.dropout:g}): lower it"
        if cfg.lr < 1e-4:
            return f"most likely train.lr (now {cfg.lr:g}), too small: raise it, e.g. --set train.lr={cfg.lr * 10:g}"
        return lower_lr
    return "the model fits the train split but not val: check the data and its labels (stage 'prepare')"


def fit(params: Params, run_id: str) -> dict:
    cfg = params.train
    device = pick_device(cfg.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(params.seed)

    manifest = inputs.manifest()
    n_classes = len(manifest["classes"])
    aug = cfg.augment
    augment = augmentation(manifest["input_shape"][-1], aug.crop_scale, aug.hflip, aug.rotation, aug.color_jitter)
    train_set = inputs.dataset("train", transform=augment)
    val_set = inputs.dataset("val")
    chance = chance_level(cfg.select_metric, torch.from_numpy(np.array(val_set.labels)), n_classes)
    cuda = device.type == "cuda"
    train_batches = loader(
        train_set, cfg.batch_size, shuffle=True, seed=params.seed, workers=cfg.num_workers, pin_memory=cuda
    )
    val_batches = loader(val_set, params.evaluate.batch_size, shuffle=False, pin_memory=cuda)
    model = inputs.model(params, paths.INIT, made_by="build").to(device)
    loss_fn = build_loss(cfg.label_smoothing)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)

    history: list[dict[str, float]] = []
    best_value: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    first_loss: float | None = None
    for epoch in range(1, cfg.epochs + 1):
        train_loss, epoch_first = train_one_epoch(model, train_batches, loss_fn, optimizer, device)
        if first_loss is None:  # the untrained model's loss: what divergence is measured against
            first_loss = epoch_first
        val = evaluate(model, val_batches, loss_fn, n_classes, device)
        row = {"train/loss": train_loss, "val/loss": val["loss"], "val/accuracy": val["accuracy"]}
        history.append({"epoch": epoch, **row})
        tracking.log_metrics(run_id, row, step=epoch)
        value = row[cfg.select_metric]
        marker = ""
        if better(cfg.select_metric, value, best_value):
            best_value, best_epoch, marker = value, epoch, "  *"
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        print(
            f"epoch {epoch:3d}/{cfg.epochs}  train/loss {train_loss:.4f}  "
            f"val/loss {val['loss']:.4f}  val/accuracy {val['accuracy']:.4f}{marker}"
        )
        gate(params, epoch, first_loss, train_loss, best_value, chance, n_classes)
    return {"history": history, "best_epoch": best_epoch, "best_state": best_state, "device": str(device)}


def gate(params: Params, epoch: int, first_loss: float, train_loss: float, best: float, chance: float, n_classes: int):
    """Stop a run that diverges or stays at chance, naming the epoch, the value and the likely culprit.

    Chance is judged on the best epoch so far: one poor epoch after good ones is not a stuck run.
    """
    cfg = params.train
    if not math.isfinite(train_loss):
        problem = f"training diverged at epoch {epoch}: train/loss is {train_loss}"
    elif train_loss > cfg.divergence_factor * first_loss:
        problem = (
            f"training diverged at epoch {epoch}: train/loss {train_loss:.4g} is {train_loss / first_loss:.3g}x "
            f"the untrained model's {first_loss:.4g} (limit: train.divergence_factor {cfg.divergence_factor:g})"
        )
    elif cfg.chance_epochs and epoch >= cfg.chance_epochs and at_chance(cfg.select_metric, best, chance):
        accuracy = cfg.select_metric.endswith("accuracy")
        baseline = "always predicting the most common class" if accuracy else "uniform guessing"
        problem = (
            f"training is stuck at chance after epoch {epoch}: the best {cfg.select_metric} so far, {best:.4f}, is "
            f"no better than {baseline} ({chance:.4f}; checked from epoch train.chance_epochs = {cfg.chance_epochs})"
        )
    else:
        return
    raise TrainingError(f"{problem}; {suspect(params, first_loss, train_loss, n_classes)}")


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    data_hash = sha256_file(require(paths.MANIFEST, made_by="prepare"))  # it holds every array's sha256
    run_id = tracking.start_run(params.flat(), tags={"data.sha256": data_hash, **ctx.tags})
    status = "FAILED"
    try:
        tracking.log_artifacts(run_id, "data", [p for p in DATA_ARTIFACTS if p.exists()])
        tracking.log_artifacts(run_id, "params", [ctx.params_path])
        result = fit(params, run_id)
        best = result["history"][result["best_epoch"] - 1]
        metrics = {
            "best_epoch": result["best_epoch"],
            "val": {"loss": best["val/loss"], "accuracy": best["val/accuracy"]},
        }
        lines = ["epoch," + ",".join(CURVE_KEYS)]
        lines += [f"{h['epoch']}," + ",".join(f"{h[k]:.6f}" for k in CURVE_KEYS) for h in result["history"]]
        # Everything that can fail, MLflow included, happens before the outputs replace the old ones.
        with staged(paths.BEST, paths.TRAIN_METRICS, paths.TRAIN_CURVES) as (best_tmp, metrics_tmp, curves_tmp):
            save_torch(result["best_state"], best_tmp)
            metrics_tmp.write_text(json_text(metrics))
            curves_tmp.write_text("\n".join(lines) + "\n")
            digest = sha256_file(best_tmp)
            tracking.log_metrics(run_id, {"best_epoch": result["best_epoch"]})
            tracking.log_artifacts(run_id, "plots", [curves_tmp])
            tracking.set_tags(run_id, {tracking.MODEL_TAG: digest})
            same = paths.BEST.exists() and sha256_file(paths.BEST) == digest
            if same and (earlier := tracking.carry_over(run_id, digest)):
                print(
                    f"train: the same weights as MLflow run {earlier}, so evaluate and export are up to date; "
                    "its test metrics and models are linked to this run"
                )
            tracking.end_run(run_id, "FINISHED")
        status = "FINISHED"  # only now: a failed rename above turns the run FAILED again
        tracking.note_run(run_id, digest)
    except BaseException as exc:
        if isinstance(exc, PipelineError):
            _quietly(tracking.set_tags, run_id, {"pipeline.error": str(exc)[:5000]})
        elif not isinstance(exc, Exception):  # stopped from outside: Ctrl-C, SIGTERM (Prefect's TerminationSignal)
            status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            _quietly(tracking.end_run, run_id, status)
    metric = params.train.select_metric
    print(f"train: best epoch {result['best_epoch']} on {result['device']}, {metric} {best[metric]:.4f}")
    return {"best": str(paths.BEST), "run_id": run_id, "best_epoch": result["best_epoch"]}


def _quietly(fn, *args) -> None:
    """Record a failure in MLflow if the store allows it; the failure itself is what the user must see."""
    with contextlib.suppress(PipelineError):
        fn(*args)
