"""Every file the steps read and write, named once, relative to the project root.

`dvc.yaml` lists the same paths as stage outputs; `tests/test_stages.py` fails when the two
disagree. Steps import their paths from here, never from another step.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")  # what dvc.yaml's stages read; tasks.params validates it

SPLITS = ("train", "val", "test")

# prepare: each split as uint8 images (N, C, H, W) and int64 labels (N,), memory-mapped .npy files
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.json"
DATA_REPORT = PREPARED / "report.json"


def images(split: str) -> Path:
    return PREPARED / f"{split}-images.npy"


def labels(split: str) -> Path:
    return PREPARED / f"{split}-labels.npy"


ARRAYS = tuple(p for split in SPLITS for p in (images(split), labels(split)))
DATA_COUNTS = Path("plots/data/counts.csv")
DATA_SIZES = Path("plots/data/sizes.csv")
DATA_SAMPLES = Path("plots/data/samples.png")

# build
INIT = Path("models/build/init.pt")
SUMMARY = Path("models/build/summary.json")

# train
BEST = Path("models/train/best.pt")
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_CURVES = Path("plots/train.csv")
RUN_NOTE = Path("models/train/run.json")  # which MLflow run made best.pt; local, not a DVC output
CHECKPOINTS = Path("models/train/checkpoints")  # a folder: the newest train.checkpoint.keep checkpoints

# evaluate
TEST_METRICS = Path("metrics/evaluate.json")
PER_CLASS = Path("metrics/per_class.json")  # precision, recall, F1 and support per class: `dvc metrics show` it
CONFUSION_CSV = Path("plots/confusion.csv")
CONFUSION_PNG = Path("plots/confusion.png")

# export
EXPORT_STATE = Path("models/export/model_state.pt")
TORCHSCRIPT = Path("models/export/model.ts")
TORCH_EXPORT = Path("models/export/model.pt2")
EXPORT_INFO = Path("models/export/model.json")

OUTPUTS = {
    "prepare": (*ARRAYS, MANIFEST, DATA_REPORT, DATA_COUNTS, DATA_SIZES, DATA_SAMPLES),
    "build": (INIT, SUMMARY),
    "train": (BEST, CHECKPOINTS, TRAIN_METRICS, TRAIN_CURVES),
    "evaluate": (TEST_METRICS, PER_CLASS, CONFUSION_CSV, CONFUSION_PNG),
    "export": (EXPORT_STATE, TORCHSCRIPT, TORCH_EXPORT, EXPORT_INFO),
    "promote": (),  # it writes to the MLflow model registry only
}
