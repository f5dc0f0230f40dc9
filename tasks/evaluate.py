"""evaluate: the best model on the test split, as metrics for `dvc metrics` and plots for `dvc plots`.

    python -m tasks evaluate         # or: dvc repro evaluate

`evaluate()` is also the per-epoch validation of `train`: one function, `model.eval()` under
`torch.no_grad()`, torchmetrics accumulating batch by batch. Writes `metrics/evaluate.json`
(accuracy, macro F1, loss, per-class precision and recall), `plots/confusion.csv` (one row per
test image, for DVC's confusion template) and `plots/confusion.png`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from tasks import tracking
from tasks.files import json_text, read_json, staged
from tasks.params import Params
from tasks.prepare import MANIFEST, load_split

METRICS = Path("metrics/evaluate.json")
CONFUSION_CSV = Path("plots/confusion.csv")
CONFUSION_PNG = Path("plots/confusion.png")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    n_classes: int,
    device: torch.device,
    batch_size: int,
) -> dict:
    """Loss, accuracy, macro F1, per-class precision/recall, confusion matrix and predictions."""
    model.eval()
    metrics = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(n_classes, average="micro"),
            "f1_macro": MulticlassF1Score(n_classes, average="macro"),
            "precision": MulticlassPrecision(n_classes, average=None),
            "recall": MulticlassRecall(n_classes, average=None),
            "confusion": MulticlassConfusionMatrix(n_classes),
        }
    ).to(device)
    total = torch.zeros((), device=device)
    predictions = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, dtype=torch.float32, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        total += loss_fn(logits, yb) * yb.shape[0]
        metrics.update(logits, yb)
        predictions.append(logits.argmax(dim=1).cpu())
    out = {k: v.cpu().tolist() for k, v in metrics.compute().items()}
    out["loss"] = total.item() / x.shape[0]
    out["predictions"] = torch.cat(predictions)
    return out


def confusion_png(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    color="white" if count > max(map(max, matrix)) / 2 else "black",
                )
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test split)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def run(params: Params) -> dict:
    from tasks.build import build_loss, load_model
    from tasks.train import BEST

    manifest = read_json(MANIFEST, made_by="prepare")
    classes = manifest["classes"]
    model = load_model(params, BEST)
    run_id = tracking.current_run_id(BEST)
    x, y = load_split("test")
    result = evaluate(
        model, x, y, build_loss(params.train), len(classes), torch.device("cpu"), params.evaluate.batch_size
    )

    test = {
        "accuracy": result["accuracy"],
        "f1_macro": result["f1_macro"],
        "loss": result["loss"],
        "per_class": {
            c: {"precision": p, "recall": r}
            for c, p, r in zip(classes, result["precision"], result["recall"], strict=True)
        },
    }
    logged = {f"test/{k}": test[k] for k in ("accuracy", "f1_macro", "loss")}
    for c in classes:
        logged[f"test/precision/{c}"] = test["per_class"][c]["precision"]
        logged[f"test/recall/{c}"] = test["per_class"][c]["recall"]
    rows = [f"{classes[a]},{classes[p]}" for a, p in zip(y.tolist(), result["predictions"].tolist(), strict=True)]

    # Logged from the staged files, so a store that fails leaves the previous outputs as they were.
    with staged(METRICS, CONFUSION_CSV, CONFUSION_PNG) as (metrics_file, csv_file, png_file):
        metrics_file.write_text(json_text({"test": test}))
        csv_file.write_text("actual,predicted\n" + "\n".join(rows) + "\n")
        confusion_png(result["confusion"], classes, png_file)
        tracking.log_metrics(run_id, logged)
        tracking.log_artifacts(run_id, "plots", [csv_file, png_file])
        tracking.log_artifacts(run_id, "metrics", [metrics_file])
    print(f"evaluate: test accuracy {test['accuracy']:.4f}, macro F1 {test['f1_macro']:.4f} on {x.shape[0]} images")
    return {"metrics": str(METRICS), "accuracy": test["accuracy"], "f1_macro": test["f1_macro"]}
