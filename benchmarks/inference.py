"""CPU inference of the exported model, format by format: latency at batch 1, throughput at batch 64.

Run from the repository root, in the project's environment, after the pipeline has exported a model:

    source scripts/env.sh
    python benchmarks/inference.py                  # about a minute on 2 cores
    python benchmarks/inference.py --json out.json  # the same numbers, also as JSON

The formats, all on the same test images, torch thread count and process:

- eager: the trained `nn.Module` (the project's model code and `models/train/best.pt`);
- TorchScript: `models/export/model.ts` as `torch.jit.load` returns it;
- TorchScript, frozen: the same after `torch.jit.freeze` (weights folded in as constants);
- torch.export: `models/export/model.pt2` as `torch.export.load(...).module()` returns it.

Each is warmed up, then timed in rounds that alternate the formats, so that a slow moment of the
machine falls on all of them alike. Latency is one image per call (median and p99 of the calls);
throughput is batches of 64 (images per second, median of the rounds). Every format's logits are
checked against eager's first.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def formats() -> dict[str, torch.nn.Module]:
    from tasks import inputs, paths
    from tasks.params import load

    params = load(ROOT / "params.yaml")
    eager = inputs.model(params, ROOT / paths.BEST, made_by="train").eval()
    with warnings.catch_warnings():  # torch.jit's deprecation notes: the point here is to measure it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(ROOT / paths.TORCHSCRIPT)).eval()
        frozen = torch.jit.freeze(torch.jit.load(str(ROOT / paths.TORCHSCRIPT)).eval())
    exported = torch.export.load(str(ROOT / paths.TORCH_EXPORT)).module()
    return {"eager": eager, "TorchScript": scripted, "TorchScript, frozen": frozen, "torch.export": exported}


def test_images(n: int) -> torch.Tensor:
    from tasks import inputs

    images = np.array(inputs.dataset("test").images)
    reps = -(-n // len(images))
    return torch.from_numpy(np.concatenate([images] * reps)[:n]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="batch-1 calls per format and round")
    parser.add_argument("--batches", type=int, default=40, help="batches of 64 per format and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import os

    os.chdir(ROOT)  # tasks.inputs reads the prepared data relative to the project root
    models = formats()
    x = test_images(max(64, args.calls))
    with torch.no_grad():
        reference = models["eager"](x[:64])
        diffs = {name: float((m(x[:64]) - reference).abs().max()) for name, m in models.items()}
        for m in models.values():  # warm-up: first calls compile, allocate, profile
            for _ in range(20):
                m(x[:1])
                m(x[:64])
        latencies: dict[str, list[float]] = {name: [] for name in models}
        throughput: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                for i in range(args.calls):
                    one = x[i : i + 1]
                    start = time.perf_counter()
                    m(one)
                    latencies[name].append(time.perf_counter() - start)
                batch = x[:64]
                start = time.perf_counter()
                for _ in range(args.batches):
                    m(batch)
                throughput[name].append(64 * args.batches / (time.perf_counter() - start))

    rows = []
    for name in models:
        lat = sorted(latencies[name])
        rows.append(
            {
                "format": name,
                "batch1_p50_ms": 1000 * statistics.median(lat),
                "batch1_p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
                "batch64_images_per_s": statistics.median(throughput[name]),
                "max_abs_diff_vs_eager": diffs[name],
            }
        )
    cpu = platform.processor() or platform.machine()
    where = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"CPU inference, {time.strftime('%Y-%m-%d')}, {where}; input {list(x.shape[1:])}, "
          f"{args.rounds} rounds of {args.calls} batch-1 calls and {args.batches} batches of 64")  # fmt: skip
    print("| format | batch 1: p50 | batch 1: p99 | batch 64: images/s | max abs diff vs eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['batch1_p50_ms']:.3f} ms | {r['batch1_p99_ms']:.3f} ms | "
              f"{r['batch64_images_per_s']:,.0f} | {r['max_abs_diff_vs_eager']:.1e} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"where": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
