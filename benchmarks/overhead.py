"""What the pipeline's train step costs over a bare training loop, on the same data, model, weights and threads.

Run from the repository root, in the project's environment:

    source scripts/env.sh
    python benchmarks/overhead.py                      # the default digits run and a run of about a minute
    python benchmarks/overhead.py --workload default   # one workload only
    python benchmarks/overhead.py --json out.json      # the numbers, also as JSON

In a temporary copy of the data (prepare and build run once), it alternates, in this one process:

- "bare": the loop a notebook or the seed project writes: the split as float tensors, a
  `DataLoader` over a `TensorDataset`, `zero_grad` / forward / loss / `backward` / `step`, an
  argmax accuracy and the loss on the validation split each epoch, the best epoch's weights kept
  and saved with `torch.save`; no checkpoints, no MLflow, no progress;
- "pipeline": `tasks.train.run` as `dvc repro` and the flow run it: a checkpoint every epoch, the
  MLflow run (its params, tags, the data and params files, one metrics point per epoch, the
  outputs), the progress line per epoch.

Both see the same order of samples each epoch (`EpochSampler`'s permutation of (seed, epoch)),
start from `models/build/init.pt` and use torch's default thread count, so they must end with the
same weights: the benchmark asserts it, byte for byte. The ratio compares the epochs alone (the
loop from the first epoch to the last); what the pipeline adds once per run (opening the MLflow
run, logging the files, writing the outputs) is reported apart, in seconds. On a shared machine
one run of either can be 20 % slower than the next, so the ratio is the median over rounds of
each round's pipeline/bare (the two run back to back), and the ratio of the fastest runs is shown
beside it. Beside both, the same median on CPU seconds (`time.process_time`, every thread of the
process: the checkpoint writer's and MLflow's logging thread's work counts against the pipeline):
what each did, which the other tenants of a shared machine inflate much less than wall time.
The first round of each is a warm-up and not counted.
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
    # The README's default run: digits, the small CNN, 30 epochs (about 2 s of training).
    "default": [],
    # The same data with a wider CNN and more epochs: about a minute of training on 2 cores.
    "minute": ["build.channels=[128,256]", "train.epochs=100"],
}


def bare_loop(params, seed: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The seed's loop; returns the wall and CPU seconds of its epochs and the best epoch's weights (saved, as
    the seed did)."""
    from tasks import inputs

    cfg = params.train
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.load(paths.images("train"))).float()
    y = torch.from_numpy(np.load(paths.labels("train")))
    val_x = torch.from_numpy(np.load(paths.images("val"))).float()
    val_y = torch.from_numpy(np.load(paths.labels("val")))
    data = TensorDataset(x, y)
    model = inputs.model(params, paths.INIT, made_by="build")
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    loss_fn = build_loss(cfg.label_smoothing)
    best, best_state = -1.0, {}
    own = torch.Generator().manual_seed(seed)  # as the seed's loader: its seed draws leave dropout's generator alone
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        model.train()
        total = torch.zeros(())
        for xb, yb in DataLoader(data, batch_size=cfg.batch_size, sampler=order, generator=own):
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach() * yb.shape[0]
        model.eval()
        with torch.no_grad():
            logits = model(val_x)
            val_loss = loss_fn(logits, val_y).item()
            accuracy = (logits.argmax(1) == val_y).float().mean().item()
        if accuracy > best:
            best, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
        del val_loss
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    torch.save(best_state, io.BytesIO())
    return seconds, cpu_seconds, best_state


def pipeline_step(params) -> tuple[float, float, float]:
    """`tasks.train.run`, its printing captured; (wall and CPU seconds of the epochs, seconds of the whole step)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.run(params)
    return result["loop_seconds"], result["loop_cpu_seconds"], time.perf_counter() - start


def measure(name: str, overrides: list[str], repetitions: int) -> dict:
    params = load(ROOT / "params.yaml", overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.run(params)
        build.run(params)
    bare, pipe, whole, bare_cpu, pipe_cpu = [], [], [], [], []
    for rep in range(repetitions + 1):  # alternating; the first round warms both up
        b, bc, state = bare_loop(params, params.seed)
        p, pc, w = pipeline_step(params)
        saved = torch.load(paths.BEST, weights_only=True)
        same = all(torch.equal(state[k], saved[k]) for k in state) and state.keys() == saved.keys()
        assert same, f"{name}: the pipeline's weights differ from the bare loop's"
        if rep:
            bare.append(b)
            pipe.append(p)
            whole.append(w)
            bare_cpu.append(bc)
            pipe_cpu.append(pc)
        print(
            f"  {name} round {rep}: bare {b:.3f} s ({bc:.3f} s CPU), pipeline epochs {p:.3f} s ({pc:.3f} s CPU), "
            f"pipeline step {w:.3f} s",
            flush=True,
        )
    b, p, w = statistics.median(bare), statistics.median(pipe), statistics.median(whole)
    paired = statistics.median(q / c for q, c in zip(pipe, bare, strict=True))
    return {
        "workload": name,
        "overrides": overrides,
        "epochs": params.train.epochs,
        "bare_seconds": bare,
        "pipeline_epoch_seconds": pipe,
        "pipeline_step_seconds": whole,
        "ratio": paired,  # the median of each round's pipeline/bare: rounds run side by side share the noise
        "ratio_of_fastest": min(pipe) / min(bare),
        # CPU seconds of every thread (the checkpoint writer's and MLflow's too): the work each did, which other
        # tenants of a shared machine do not inflate as they do wall time.
        "bare_cpu_seconds": bare_cpu,
        "pipeline_cpu_seconds": pipe_cpu,
        "cpu_ratio": statistics.median(q / c for q, c in zip(pipe_cpu, bare_cpu, strict=True)),
        "per_epoch_ms": (p - b) / params.train.epochs * 1000,
        "fixed_seconds": w - p,
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
    header = ("workload", "epochs", "bare s", "pipeline s", "ratio", "fastest", "CPU ratio", "per epoch", "fixed/run")
    print("{:10} {:>6} {:>8} {:>11} {:>6} {:>8} {:>9} {:>10} {:>10}".format(*header))
    for r in results:
        print(
            f"{r['workload']:10} {r['epochs']:6d} {statistics.median(r['bare_seconds']):8.3f} "
            f"{statistics.median(r['pipeline_epoch_seconds']):11.3f} {r['ratio']:6.3f} {r['ratio_of_fastest']:8.3f} "
            f"{r['cpu_ratio']:9.3f} "
            f"{r['per_epoch_ms']:8.1f}ms {r['fixed_seconds']:9.2f}s"
        )
    print("ratio: median over rounds of pipeline/bare; fastest: fastest pipeline / fastest bare;")
    print("CPU ratio: the same median on the CPU seconds of all the process's threads")
    print("weights: identical, byte for byte, in every round")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
