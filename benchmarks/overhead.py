"""What the pipeline's train step costs over a bare training loop, on the same data, model, weights and threads.

Run from the repository root, in the project's environment:

    source scripts/env.sh
    python benchmarks/overhead.py                      # the default digits run and a run of about a minute
    python benchmarks/overhead.py --workload default   # one workload only
    python benchmarks/overhead.py --json out.json      # the numbers, also as JSON

In a temporary copy of the data (prepare and build run once), it runs, in this one process:

- "bare": the loop a notebook or the seed project writes: the split as float tensors, a
  `DataLoader` over a `TensorDataset`, `zero_grad` / forward / loss / `backward` / `step`, an
  argmax accuracy and the loss on the validation split each epoch, the best epoch's weights kept;
  no checkpoints, no MLflow, no progress;
- "pipeline": `tasks.train.run` as `dvc repro` and the flow run it: a checkpoint every epoch, the
  MLflow run (its params, tags, the data and params files, one metrics point per epoch, the
  outputs), the progress line per epoch.

The two alternate epoch by epoch: after each of the pipeline's validations, one bare epoch runs
(with torch's global generator of its own), so that both see the machine as it is within the
same tenth of a second. On a shared machine two runs a few seconds apart differed by up to 2x, and
comparing whole runs, even alternating, could not tell 1.00 from 1.08; within one round the
epochs of both move together. Where the bare epoch sits, the checkpoint the pipeline began
writing at the end of its previous epoch has long been written, and its next one and its MLflow
call come after; the pipeline's epoch time is its loop's time less the bare epochs'.

Both see the same order of samples each epoch (`EpochSampler`'s permutation of (seed, epoch)),
start from `models/build/init.pt` and use torch's default thread count, so they must end with the
same weights: the benchmark asserts it, byte for byte. The ratio compares the epochs alone; what
the pipeline adds once per run (opening the MLflow run, logging the files, writing the outputs) is
reported apart, in seconds. The ratio is the median over rounds of each round's pipeline/bare,
with the lowest and highest beside it; beside those, the same median on CPU seconds
(`time.process_time`, every thread of the process). The first round is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `tasks` importable
from tasks import build, paths, prepare, train  # noqa: E402
from tasks.core.models import build_loss, build_optimizer  # noqa: E402
from tasks.params import load  # noqa: E402

WORKLOADS = {
    # The README's default run: digits, the small CNN, 30 epochs (about 2-3 s of training).
    "default": [],
    # About a minute of training: the same CNN on the digits at 64 pixels a side (64 times the work
    # per image, the same weights).
    "minute": ["prepare.image_size=64", "train.epochs=24"],
    # About a minute too, but of many short epochs of a wide model: 100 epochs of about 0.35 s, each
    # ending in a checkpoint of 4.8 MB (the weights, AdamW's two moments and the best weights).
    "wide": ["build.channels=[128,256]", "train.epochs=100"],
}


class BareLoop:
    """The seed's loop, one epoch per call, with torch's global generator (dropout's) of its own."""

    def __init__(self, params, seed: int) -> None:
        from tasks import inputs

        cfg = params.train
        self.cfg, self.seed = cfg, seed
        x = torch.from_numpy(np.load(paths.images("train"))).float()
        y = torch.from_numpy(np.load(paths.labels("train")))
        self.val_x = torch.from_numpy(np.load(paths.images("val"))).float()
        self.val_y = torch.from_numpy(np.load(paths.labels("val")))
        self.data = TensorDataset(x, y)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)  # building the model draws from it, as the pipeline's does, before loading init.pt
        self.model = inputs.model(params, paths.INIT, made_by="build")
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.loss_fn = build_loss(cfg.label_smoothing)
        self.best, self.best_state = -1.0, {}
        self.own = torch.Generator().manual_seed(seed)  # as the seed's loader: its draws leave dropout's alone
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)

    def epoch(self, epoch: int) -> None:
        outer = torch.get_rng_state()  # the pipeline's: it goes on where it was after this epoch
        torch.set_rng_state(self.rng)
        model, optimizer, loss_fn = self.model, self.optimizer, self.loss_fn
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        model.train()
        total = torch.zeros(())
        for xb, yb in DataLoader(self.data, batch_size=self.cfg.batch_size, sampler=order, generator=self.own):
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach() * yb.shape[0]
        model.eval()
        with torch.no_grad():
            logits = model(self.val_x)
            val_loss = loss_fn(logits, self.val_y).item()
            accuracy = (logits.argmax(1) == self.val_y).float().mean().item()
        if accuracy > self.best:
            self.best, self.best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
        del val_loss
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)


def interleaved_round(params) -> dict:
    """One run of `tasks.train.run` with one bare epoch after each of its epochs; the seconds of each.

    The bare epoch runs right after the pipeline's validation: the checkpoint the pipeline started
    writing at the end of its previous epoch overlaps the pipeline's own training, as in any run,
    and is on disk long before; the pipeline's next checkpoint and MLflow call come after.
    """
    bare = BareLoop(params, params.seed)
    spent = {"wall": 0.0, "cpu": 0.0, "epoch": 0}
    real = train.validate

    def validate_then_bare(*args, **kwargs):
        result = real(*args, **kwargs)
        spent["epoch"] += 1
        wall, cpu = time.perf_counter(), time.process_time()
        bare.epoch(spent["epoch"])
        spent["wall"] += time.perf_counter() - wall
        spent["cpu"] += time.process_time() - cpu
        return result

    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    train.validate = validate_then_bare
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = train.run(params)
    finally:
        train.validate = real
    whole = time.perf_counter() - start
    saved = torch.load(paths.BEST, weights_only=True)
    state = bare.best_state
    same = state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)
    assert same, "the pipeline's weights differ from the bare loop's"
    return {
        "bare": spent["wall"],
        "bare_cpu": spent["cpu"],
        "pipeline": result["loop_seconds"] - spent["wall"],
        "pipeline_cpu": result["loop_cpu_seconds"] - spent["cpu"],
        "fixed": whole - result["loop_seconds"],
    }


def measure(name: str, overrides: list[str], repetitions: int) -> dict:
    params = load(ROOT / "params.yaml", overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.run(params)
        build.run(params)
    rounds = []
    for rep in range(repetitions + 1):  # the first round warms both up
        r = interleaved_round(params)
        print(
            f"  {name} round {rep}: bare epochs {r['bare']:.3f} s ({r['bare_cpu']:.3f} s CPU), pipeline epochs "
            f"{r['pipeline']:.3f} s ({r['pipeline_cpu']:.3f} s CPU), ratio {r['pipeline'] / r['bare']:.3f}, "
            f"once per run {r['fixed']:.3f} s",
            flush=True,
        )
        if rep:
            rounds.append(r)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ratios = [r["pipeline"] / r["bare"] for r in rounds]
    return {
        "workload": name,
        "overrides": overrides,
        "epochs": params.train.epochs,
        "rounds": rounds,
        "bare_seconds": median("bare"),
        "pipeline_seconds": median("pipeline"),
        "ratio": statistics.median(ratios),  # each round's own: its two loops shared the machine's moods
        "ratio_range": [min(ratios), max(ratios)],
        "cpu_ratio": statistics.median(r["pipeline_cpu"] / r["bare_cpu"] for r in rounds),
        "per_epoch_ms": statistics.median((r["pipeline"] - r["bare"]) / params.train.epochs * 1000 for r in rounds),
        "fixed_seconds": median("fixed"),
        "identical_weights": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--repetitions", type=int, default=5, help="counted rounds per workload (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    here = Path.cwd()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    results = []
    try:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        for name in names:
            results.append(measure(name, WORKLOADS[name], args.repetitions))
    finally:
        os.chdir(here)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repetitions} rounds")  # fmt: skip
    header = ("workload", "epochs", "bare s", "pipeline s", "ratio", "lowest-highest", "CPU ratio", "per epoch")
    header += ("once/run",)
    print("{:10} {:>6} {:>8} {:>11} {:>6} {:>15} {:>9} {:>10} {:>9}".format(*header))
    for r in results:
        low, high = r["ratio_range"]
        print(
            f"{r['workload']:10} {r['epochs']:6d} {r['bare_seconds']:8.3f} {r['pipeline_seconds']:11.3f} "
            f"{r['ratio']:6.3f} {low:7.3f}-{high:.3f} {r['cpu_ratio']:9.3f} {r['per_epoch_ms']:8.1f}ms "
            f"{r['fixed_seconds']:8.2f}s"
        )
    print("ratio: median over rounds of the pipeline's epochs / the bare epochs run between them;")
    print("CPU ratio: the same on the CPU seconds of all the process's threads")
    print("weights: identical, byte for byte, in every round")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
