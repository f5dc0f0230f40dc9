"""Training input path on the CPU: a tutorial-style per-file loader against the project's memory-mapped arrays.

Run from the repository root, in the project's environment:

    source scripts/env.sh
    python benchmarks/input_path.py                 # full run: a few minutes on 2 cores
    python benchmarks/input_path.py --quick         # smoke run: well under a minute
    python benchmarks/input_path.py --json out.json # the same numbers, also as JSON

What it shows, on the same images, model, batch size and torch thread count:

1. Training speed (samples/s per epoch, and the median) of two ways of feeding a small CNN:
   - "seed": what a seed project or tutorial writes, a per-sample `Dataset` over file paths that
     opens and decodes every image with Pillow and resizes it with `torchvision.transforms` on
     every epoch, batched by the default collate;
   - "project": the images decoded once by `tasks.core.sources.decode_folder` into a uint8
     memory-mapped `.npy`, read whole batches at a time by `tasks.core.data.ImageArrays` and
     `tasks.core.data.loader`. The one-off decode is timed and reported on its own.
   A pass over each loader with no model ("input only") shows the input cost without the compute.
2. Peak memory of training with the project loader as the data grows (1x, 4x, 10x by default):
   each size trains one epoch in a fresh child process that only opens the prepared `.npy` files,
   so the peaks do not mix and the decode is not counted.

The peak is the child's `VmHWM` (/proc/self/status). `getrusage(RUSAGE_SELF).ru_maxrss` is shown
too but is not the headline: Linux carries the parent's peak into a child started with
vfork/exec (Python's subprocess), so that number never falls below the parent's peak. The child
also reports its anonymous and file-backed resident memory after the epoch: pages of the mapped
`.npy` that the epoch touched count as file-backed RSS (page cache the kernel can drop), while
anonymous memory (what a full load into RAM would cost) is what should stay flat.

The images are scikit-learn's 1,797 digits (8x8, 0-16), scaled to 0-255, tinted to RGB,
upscaled to a random 160-320 px per side (`--source-size`; photos are usually larger) and written
as PNG and JPEG in an ImageFolder layout in a temporary folder, removed at the end. `--scale K`
makes K byte-identical copies of each file under new names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms  # here, so that no timed section (the decode) pays torchvision's import

# Run as a script from the repository root, the project is not installed: make `tasks` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.core.data import EpochSampler, ImageArrays, loader  # noqa: E402
from tasks.core.loops import train_one_epoch  # noqa: E402
from tasks.core.models import build_model  # noqa: E402
from tasks.core.sources import Folder, decode_folder, scan_folder  # noqa: E402

SEED = 0
CPU = torch.device("cpu")
MAX_PIXELS = 40_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image side S the model sees (default 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--epochs", type=int, default=3, help="timed training epochs per loader (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both loaders (default 2)")
    parser.add_argument("--images", type=int, default=1797, help="how many of the 1,797 digits to use (default all)")
    parser.add_argument(
        "--scale",
        type=int,
        nargs="+",
        default=[1, 4, 10],
        help="data sizes for the memory test, 1x always (default 1 4 10)",
    )
    parser.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        default=[160, 320],
        metavar=("MIN", "MAX"),
        help="side of the image files, drawn per image (default 160 320, smaller than most photos; "
        "32 48 shows the case where decoding costs least)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 images, 1 epoch, --scale 1 2")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)  # internal: train over <dir>/*.npy
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.scale = 300, 1, [1, 2]
    if not 1 <= args.images <= 1797 or min(args.scale) < 1 or args.epochs < 1:
        parser.error("--images must be 1..1797, --scale and --epochs at least 1")
    args.scale = sorted(set(args.scale) | {1})  # 1x also feeds the speed comparison
    return args


# --- images --------------------------------------------------------------------------------------


def write_images(root: Path, n: int, copies: int, sizes: tuple[int, int]) -> None:
    """`root/<digit>/<i>_<copy>.png|jpg`: n tinted, upscaled digits, each written once and then copied.

    Copies are byte-identical, so every scale decodes the same pixels and only the amount grows.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    for i in range(n):
        grey = digits.images[i] * (255 / 16)
        rgb = np.round(grey[..., None] * rng.uniform(0.3, 1.0, size=3)).astype(np.uint8)
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        image = Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.BILINEAR)
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        ext = "png" if i % 2 == 0 else "jpg"
        first = folder / f"{i:05d}_0.{ext}"
        image.save(first)
        for copy in range(1, copies):
            shutil.copyfile(first, folder / f"{i:05d}_{copy}.{ext}")


def copies_below(folder: Folder, k: int) -> Folder:
    """The scanned folder cut down to copies 0..k-1 of every image: the data at scale k."""
    keep = [j for j, rel in enumerate(folder.files) if int(Path(rel).stem.split("_")[1]) < k]
    return replace(folder, files=[folder.files[j] for j in keep], labels=[folder.labels[j] for j in keep])


def prepare_arrays(folder: Folder, size: int, out: Path) -> float:
    """Decode `folder` once, as the project's prepare step does, into out/images.npy and labels.npy; seconds."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    shape = (len(folder.files), 3, size, size)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
    results = decode_folder(folder, 3, size, "stretch", MAX_PIXELS, 1, images)
    bad = {rel: r.reason for rel, r in zip(folder.files, results, strict=True) if r.reason}
    if bad:
        raise SystemExit(f"decode_folder refused generated images: {bad}")
    images.flush()
    del images
    np.save(out / "labels.npy", np.asarray(folder.labels, dtype=np.int64))
    return time.perf_counter() - start


# --- the two loaders -----------------------------------------------------------------------------


class ImageFiles(Dataset):
    """The seed baseline: file paths, each opened, decoded and resized on every `__getitem__`."""

    def __init__(self, paths: list[Path], labels: list[int], transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.paths[i]).convert("RGB")
        return self.transform(image), self.labels[i]


def seed_loader(folder: Folder, size: int, batch_size: int) -> DataLoader:
    """The tutorial loader: classic torchvision transforms, default collate, shuffled."""
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    paths = [folder.root / rel for rel in folder.files]
    return DataLoader(ImageFiles(paths, folder.labels, transform), batch_size=batch_size, shuffle=True)


def project_loader(arrays: Path, batch_size: int) -> DataLoader:
    dataset = ImageArrays(arrays / "images.npy", arrays / "labels.npy", transform=None)
    return loader(dataset, batch_size, EpochSampler(len(dataset), SEED), workers=0)


# --- training ------------------------------------------------------------------------------------


def new_model(size: int, n_classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    """The same CNN, initial weights, optimizer and loss for every run (the seed is set here)."""
    torch.manual_seed(SEED)
    normalisation = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = build_model("cnn", [3, size, size], n_classes, normalisation, channels=[32, 64], hidden=[128], dropout=0.1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.003), torch.nn.CrossEntropyLoss()


def input_only(batches: DataLoader) -> float:
    """Samples/s of one pass over the loader with no model: the input path's own cost."""
    start = time.perf_counter()
    for _ in batches:
        pass
    return len(batches.dataset) / (time.perf_counter() - start)


def train_rates(batches: DataLoader, size: int, n_classes: int, epochs: int) -> tuple[list[float], float]:
    """Samples/s of each training epoch (the project's `train_one_epoch`), and the last epoch's mean loss."""
    model, optimizer, loss_fn = new_model(size, n_classes)
    rates, loss = [], float("nan")
    for _ in range(epochs):
        start = time.perf_counter()
        state = train_one_epoch(model, batches, loss_fn, optimizer, CPU, len(batches))
        loss = state.loss_sum.item() / state.seen
        rates.append(len(batches.dataset) / (time.perf_counter() - start))
    return rates, loss


def compare_speed(folder: Folder, arrays: Path, args: argparse.Namespace) -> dict:
    loaders = {
        "seed": seed_loader(folder, args.size, args.batch_size),
        "project": project_loader(arrays, args.batch_size),
    }
    speed = {}
    for name, batches in loaders.items():
        rates, loss = train_rates(batches, args.size, len(folder.classes), args.epochs)
        speed[name] = {
            "epoch_samples_per_s": rates,
            "median_samples_per_s": statistics.median(rates),
            "input_only_samples_per_s": input_only(batches),
            "last_epoch_loss": loss,
        }
    for key, ratio in (("median_samples_per_s", "speedup"), ("input_only_samples_per_s", "input_only_speedup")):
        speed[ratio] = speed["project"][key] / speed["seed"][key]
    return speed


# --- memory --------------------------------------------------------------------------------------


def status_kib(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB: VmHWM is this process's own peak RSS since it started."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0])
    return values


def rss_child(arrays: Path, batch_size: int) -> dict:
    """Inside the fresh child: open the mapped arrays, train one epoch, report memory (KiB)."""
    batches = project_loader(arrays, batch_size)
    _, _, size, _ = batches.dataset.shape
    n_classes = int(batches.dataset.labels.max()) + 1
    model, optimizer, loss_fn = new_model(size, n_classes)
    setup = status_kib("VmHWM")["VmHWM"]
    start = time.perf_counter()
    train_one_epoch(model, batches, loss_fn, optimizer, CPU, len(batches))
    seconds = time.perf_counter() - start
    after = status_kib("VmHWM", "RssAnon", "RssFile")
    return {
        "setup_peak_kib": setup,
        "peak_kib": after["VmHWM"],
        "rss_anon_kib": after["RssAnon"],
        "rss_file_kib": after["RssFile"],
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "epoch_samples_per_s": len(batches.dataset) / seconds,
    }


def measure_memory(folder: Folder, arrays_for: dict[int, Path], args: argparse.Namespace) -> list[dict]:
    """One fresh child per scale, so each peak is its own; the decode happened here, before."""
    rows = []
    for k, arrays in arrays_for.items():
        command = [sys.executable, __file__, "--rss-child", str(arrays)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"the --rss-child run at scale {k} failed:\n{done.stderr}")
        child = json.loads(done.stdout.splitlines()[-1])
        npy = (arrays / "images.npy").stat().st_size
        rows.append({"scale": k, "images": len(copies_below(folder, k).files), "npy_bytes": npy, **child})
    return rows


# --- report --------------------------------------------------------------------------------------


def machine() -> dict:
    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
    ]
    model = names[0] if names else platform.processor()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the cores skews every number
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_report(result: dict) -> None:
    a, m, s = result["args"], result["machine"], result["speed"]
    print(f"\n{m['cpu']}, {m['cores']} cores, load average {m['load_average_1min']:.2f} at the start")
    print(f"torch {m['torch']}, {a['threads']} threads, python {m['python']}")
    lo, hi = a["source_size"]
    print(
        f"{result['images']} image files of {lo}-{hi} px a side, trained at {a['size']}x{a['size']}, "
        f"batch {a['batch_size']}, epochs: {a['epochs']}\n"
    )
    print(f"{'loader':<9} {'epochs (samples/s)':<30} {'median':>8} {'input only':>11} {'last loss':>10}")
    for name in ("seed", "project"):
        r = s[name]
        epochs = " ".join(f"{v:7.0f}" for v in r["epoch_samples_per_s"])
        row = f"{r['median_samples_per_s']:8.0f} {r['input_only_samples_per_s']:11.0f} {r['last_epoch_loss']:10.3f}"
        print(f"{name:<9} {epochs:<30} {row}")
    print(f"speed-up of project over seed: {s['speedup']:.2f}x training, {s['input_only_speedup']:.2f}x input only")
    print(f"one-off decode for the project loader: {result['decode_seconds'][0]['seconds']:.1f} s (paid once)\n")

    mib = 1024
    print("project loader, 1 epoch in a fresh process per size (MiB):")
    header = f"{'scale':>5} {'images':>7} {'decode s':>9} {'npy':>7} {'setup peak':>11} {'peak RSS':>9}"
    print(f"{header} {'anon':>7} {'file':>7} {'ru_maxrss':>10} {'samples/s':>10}")
    for row, decode in zip(result["memory"], result["decode_seconds"], strict=True):
        line = f"{row['scale']:>4}x {row['images']:>7} {decode['seconds']:>9.1f} {row['npy_bytes'] / 2**20:>7.1f}"
        line += f" {row['setup_peak_kib'] / mib:>11.1f} {row['peak_kib'] / mib:>9.1f}"
        line += f" {row['rss_anon_kib'] / mib:>7.1f} {row['rss_file_kib'] / mib:>7.1f}"
        print(f"{line} {row['ru_maxrss_kib'] / mib:>10.1f} {row['epoch_samples_per_s']:>10.0f}")
    print(
        "peak RSS = the child's VmHWM; anon/file = its resident memory after the epoch (file includes the pages\n"
        "of the mapped .npy the epoch read); ru_maxrss includes the parent's peak (vfork/exec), see the docstring."
    )
    print(f"total wall time: {result['wall_seconds']:.0f} s")


def run(args: argparse.Namespace) -> dict:
    start, info = time.perf_counter(), machine()
    work = Path(tempfile.mkdtemp(prefix="input_path_"))
    try:
        write_images(work / "images", args.images, max(args.scale), tuple(args.source_size))
        folder = scan_folder(work / "images")
        arrays_for, decode = {}, []
        for k in args.scale:
            arrays_for[k] = work / f"arrays_{k}x"
            decode.append({"scale": k, "seconds": prepare_arrays(copies_below(folder, k), args.size, arrays_for[k])})
        one = copies_below(folder, 1)
        speed = compare_speed(one, arrays_for[1], args)
        memory = measure_memory(folder, arrays_for, args)
    finally:
        shutil.rmtree(work)
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "rss_child")},
        "machine": info,
        "images": len(one.files),
        "speed": speed,
        "decode_seconds": decode,
        "memory": memory,
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.batch_size)))
        return
    result = run(args)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
