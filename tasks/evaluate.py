"""evaluate: the best model on the test split, as metrics for `dvc metrics` and plots for `dvc plots`.

    python -m tasks evaluate         # or: dvc repro evaluate

The evaluation is `tasks/core/loops.py` `evaluate`, also the per-epoch validation of `train`:
one function, `model.eval()` under `torch.no_grad()`, torchmetrics accumulating batch by batch.
Writes `metrics/evaluate.json` (accuracy, macro F1, loss), `metrics/per_class.json` (precision,
recall, F1 and support per class), `plots/confusion.csv` (one row per test image, for DVC's
confusion template) and `plots/confusion.png`.

In MLflow the per-class numbers are one table (`per_class.json`, shown as a table in the run's
artifacts), not 2 metrics per class: the run page then shows the learning curves first, not a
wall of single-point charts.
"""

from __future__ import annotations

import tempfile
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
    model = inputs.model(params, paths.BEST, made_by="train")
    run_id = tracking.current_run_id(paths.BEST)
    with tracking.stage_run(run_id, "evaluate"):
        return _evaluate(params, model, run_id)


def _evaluate(params: Params, model: torch.nn.Module, run_id: str) -> dict:
    classes = inputs.manifest()["classes"]
    test_set = inputs.dataset("test")
    loss_fn = build_loss(params.train.label_smoothing)
    batches = loader(test_set, params.evaluate.batch_size)
    result = evaluate(model, batches, loss_fn, len(classes), torch.device("cpu"))

    test = {"accuracy": result["accuracy"], "f1_macro": result["f1_macro"], "loss": result["loss"]}
    support = [sum(row) for row in result["confusion"]]
    table = {"class": list(classes), "precision": result["precision"], "recall": result["recall"]}
    pairs = zip(table["precision"], table["recall"], strict=True)
    table["f1"] = [2 * p * r / (p + r) if p + r else 0.0 for p, r in pairs]
    table["support"] = support
    per_class = {c: {k: table[k][i] for k in ("precision", "recall", "f1", "support")} for i, c in enumerate(classes)}
    pairs = zip(result["labels"].tolist(), result["predictions"].tolist(), strict=True)
    rows = [f"{csv_cell(classes[a])},{csv_cell(classes[p])}" for a, p in pairs]

    # Logged from the staged files, so a store that fails leaves the previous outputs as they were.
    outputs = (paths.TEST_METRICS, paths.PER_CLASS, paths.CONFUSION_CSV, paths.CONFUSION_PNG)
    with staged(*outputs) as (metrics_file, per_class_file, csv_file, png_file), tempfile.TemporaryDirectory() as tmp:
        metrics_file.write_text(json_text({"test": test}))
        per_class_file.write_text(json_text({"per_class": per_class}))
        csv_file.write_text("actual,predicted\n" + "\n".join(rows) + "\n")
        confusion_png(result["confusion"], classes, png_file)
        tracking.log_metrics(run_id, {f"test/{k}": v for k, v in test.items()})
        tracking.log_datasets(run_id, [inputs.split_record("test")])
        table_file = Path(tmp) / "per_class.json"  # the MLflow run's table: one row per class
        table_file.write_text(tracking.table_json(table))
        tracking.log_table(run_id, table_file)
        tracking.log_artifacts(run_id, "plots", [csv_file, png_file])
        tracking.log_artifacts(run_id, "metrics", [metrics_file, per_class_file])
    n = len(test_set)
    print(f"evaluate: test accuracy {test['accuracy']:.4f}, macro F1 {test['f1_macro']:.4f} on {n} images")
    return {"metrics": str(paths.TEST_METRICS), "accuracy": test["accuracy"], "f1_macro": test["f1_macro"]}
