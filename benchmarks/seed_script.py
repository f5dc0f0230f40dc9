"""The seed's whole job in one process, as a notebook writes it: the yardstick of `benchmarks/startup.py`.

    python benchmarks/seed_script.py OUT_DIR

Loads scikit-learn's digits, splits them stratified (70/15/15, seed 42), trains the default CNN
(the project's `cnn` with channels [32, 64], dropout 0.1) for 30 epochs of the plain loop with
AdamW (lr 0.003, weight decay 1e-4) and a validation each epoch, keeps the best epoch's weights,
reports the test accuracy, and writes `best.pt` (`torch.save`) and `model.ts` (TorchScript) into
OUT_DIR. No checkpoints, no MLflow, no Prefect, no DVC. Prints its wall time, imports included.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tasks.core.models import cnn  # noqa: E402  (torch only: the same architecture as the pipeline's)

SEED, EPOCHS, BATCH = 42, 30, 64
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # deprecated, still what users run


def main(out: Path) -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), levels 0-16
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.15, stratify=y, random_state=SEED)
    train, val = train_test_split(rest, test_size=0.15 / 0.85, stratify=y[rest], random_state=SEED)
    mean, std = x[train].mean(), x[train].std()
    to = lambda i: (torch.from_numpy((x[i] - mean) / std), torch.from_numpy(y[i]))  # noqa: E731
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = to(train), to(val), to(test)

    model = cnn([1, 8, 8], 10, [32, 64], 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=BATCH, shuffle=True)
    best, best_state = -1.0, {}
    for _epoch in range(EPOCHS):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
        if accuracy > best:
            best, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        test_accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, out / "best.pt")
    torch.jit.save(torch.jit.script(model), str(out / "model.ts"))
    print(f"test accuracy {test_accuracy:.4f}; {time.perf_counter() - START:.2f} s, imports included")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("seed-out"))
