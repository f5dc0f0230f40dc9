"""train: the classic loop, validated every epoch, keeping the best epoch's weights.

    python -m tasks train            # or: dvc repro train

Per epoch: `model.train()`, shuffled batches through `zero_grad` / forward / loss /
`backward` / `step`, then validation with `model.eval()` under `torch.no_grad()` (see
`tasks.evaluate.evaluate`). The weights of the epoch with the best `train.select_metric` are
kept in `models/train/best.pt`. Runs on CPU, or on CUDA when present (`train.device: auto`).

Same seed, same params, same machine: byte-identical weights. The seed fixes the initial
weights (from `build`), the shuffling (a dedicated generator) and dropout, and
`torch.use_deterministic_algorithms` rules out nondeterministic kernels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks import tracking
from tasks.build import INIT, build_loss, build_optimizer, load_model
from tasks.evaluate import evaluate
from tasks.files import read_json, require, save_torch, sha256_file, write_json, write_text
from tasks.params import PARAMS_FILE, Params
from tasks.prepare import MANIFEST, TENSORS, load_split

OUT_DIR = Path("models/train")
BEST = OUT_DIR / "best.pt"
METRICS = Path("metrics/train.json")
CURVES = Path("plots/train.csv")
CURVE_KEYS = ("train/loss", "val/loss", "val/accuracy")


class TrainingError(Exception):
    """Training cannot go on; the message says why and what to change."""


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


def fit(params: Params, run_id: str) -> dict:
    cfg = params.train
    device = pick_device(cfg.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(params.seed)

    n_classes = len(read_json(MANIFEST, made_by="prepare")["classes"])
    train_x, train_y = load_split("train")
    val_x, val_y = load_split("val")
    # Convert once: the loader then only slices ready float tensors.
    loader = DataLoader(
        TensorDataset(train_x.float(), train_y),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(params.seed),
        pin_memory=device.type == "cuda",
    )
    model = load_model(params, INIT).to(device)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)

    history: list[dict[str, float]] = []
    best_value: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total = torch.zeros((), device=device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach() * y.shape[0]
        train_loss = total.item() / len(loader.dataset)
        if not math.isfinite(train_loss):
            raise TrainingError(f"train/loss is {train_loss} at epoch {epoch}; lower train.lr (now {cfg.lr})")

        val = evaluate(model, val_x, val_y, loss_fn, n_classes, device, batch_size=params.evaluate.batch_size)
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
    return {"history": history, "best_epoch": best_epoch, "best_state": best_state, "device": str(device)}


def run(params: Params, tags: dict[str, str] | None = None, params_path: Path = PARAMS_FILE) -> dict:
    data_hash = sha256_file(require(TENSORS, made_by="prepare"))
    run_id = tracking.start_run(params.flat(), tags={"data.sha256": data_hash, **(tags or {})})
    try:
        tracking.log_artifacts(run_id, "data", [MANIFEST])
        tracking.log_artifacts(run_id, "params", [params_path])
        result = fit(params, run_id)
        best = result["history"][result["best_epoch"] - 1]
        save_torch(result["best_state"], BEST)
        write_json(
            METRICS,
            {"best_epoch": result["best_epoch"], "val": {"loss": best["val/loss"], "accuracy": best["val/accuracy"]}},
        )
        lines = ["epoch," + ",".join(CURVE_KEYS)]
        lines += [f"{h['epoch']}," + ",".join(f"{h[k]:.6f}" for k in CURVE_KEYS) for h in result["history"]]
        write_text(CURVES, "\n".join(lines) + "\n")
        # Last: the later stages find the run through this file.
        write_json(tracking.RUN_FILE, {"run_id": run_id, "tracking_uri": tracking.tracking_uri()})
        tracking.log_metrics(run_id, {"best_epoch": result["best_epoch"]})
        tracking.log_artifacts(run_id, "plots", [CURVES])
    except BaseException:
        tracking.end_run(run_id, ok=False)
        raise
    tracking.end_run(run_id, ok=True)
    metric = params.train.select_metric
    print(f"train: best epoch {result['best_epoch']} on {result['device']}, {metric} {best[metric]:.4f}")
    return {"best": str(BEST), "run_id": run_id, "best_epoch": result["best_epoch"]}
