"""evaluate: the best model on the test split, as metrics for `dvc metrics` and plots for `dvc plots`.

    python -m tasks evaluate         # or: dvc repro evaluate

The evaluation is `tasks/core/loops.py` `evaluate`, also the per-epoch validation of `train`:
one function, `model.eval()` under `torch.no_grad()`, torchmetrics accumulating batch by batch.
Writes `metrics/evaluate.json` (accuracy, macro F1, loss, per-class precision and recall),
`plots/confusion.csv` (one row per test image, for DVC's confusion template) and
`plots/confusion.png`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks import BY_HAND, StepContext, inputs, paths, tracking
from tasks.core.data import loader
from tasks.core.loops import evaluate
from tasks.core.models import build_loss
from tasks.files import csv_cell, json_text, staged
from tasks.params import Params


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


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    manifest = inputs.manifest()
    classes = manifest["classes"]
    model = inputs.model(params, paths.BEST, made_by="train")
    run_id = tracking.current_run_id(paths.BEST)
    test_set = inputs.dataset("test")
    loss_fn = build_loss(params.train.label_smoothing)
    batches = loader(test_set, params.evaluate.batch_size)
    result = evaluate(model, batches, loss_fn, len(classes), torch.device("cpu"))

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
    pairs = zip(result["labels"].tolist(), result["predictions"].tolist(), strict=True)
    rows = [f"{csv_cell(classes[a])},{csv_cell(classes[p])}" for a, p in pairs]

    # Logged from the staged files, so a store that fails leaves the previous outputs as they were.
    outputs = (paths.TEST_METRICS, paths.CONFUSION_CSV, paths.CONFUSION_PNG)
    with staged(*outputs) as (metrics_file, csv_file, png_file):
        metrics_file.write_text(json_text({"test": test}))
        csv_file.write_text("actual,predicted\n" + "\n".join(rows) + "\n")
        confusion_png(result["confusion"], classes, png_file)
        tracking.log_metrics(run_id, logged)
        tracking.log_artifacts(run_id, "plots", [csv_file, png_file])
        tracking.log_artifacts(run_id, "metrics", [metrics_file])
    n = len(test_set)
    print(f"evaluate: test accuracy {test['accuracy']:.4f}, macro F1 {test['f1_macro']:.4f} on {n} images")
    return {"metrics": str(paths.TEST_METRICS), "accuracy": test["accuracy"], "f1_macro": test["f1_macro"]}
