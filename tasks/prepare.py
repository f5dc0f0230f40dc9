"""prepare: read the raw images once, check them, split them, and cache them as memory-mapped arrays.

    python -m tasks prepare          # or: dvc repro prepare

Sources (`prepare.dataset`): `digits` (scikit-learn's 1,797 handwritten digits, 8x8, shipped with
the package), `imagefolder` (your images in `prepare.root`/<class>/<image>, or already split in
`train/`, `val/` and `test/` folders), `mnist` and `fashion_mnist` (torchvision's IDX files under
`prepare.root`). Every image is decoded once, in parallel processes and in a fixed order,
converted to `prepare.channels` and `prepare.image_size` (by the `prepare.resize` policy), and
stored per split as uint8 `.npy` arrays: a few files for DVC to track, however many images there
were. The split is stratified and seeded; normalisation statistics come from the train split only.

Bad files (corrupt, truncated, not an image, empty, too many pixels, a symlink out of the root,
unreadable, the same bytes twice) stop the run before anything is written, naming the first ones
and the count (`prepare.on_bad_sample: error`), or are left out and listed with their reasons in
`data/prepared/report.json` (`skip`). The report also holds the counts per class and split and
the original image sizes, which `plots/data/` shows through `dvc plots`, with a grid of samples.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from serve import preprocess
from tasks import BY_HAND, StepContext, paths
from tasks.core import sources
from tasks.core.arrays import channel_stats, rows_per_chunk, stratified_split
from tasks.errors import DataError
from tasks.files import csv_cell, file_hashes, json_text, staged
from tasks.params import Params

# With prepare.workers: 0, fewer images than this are decoded in this process: each worker process
# imports torch first, and on 2 cores 1,800 small images decoded in 3 s alone, 6.5 s with 2 workers.
SERIAL_BELOW = 5000
SHOWN = 5  # bad files named on the console; the report lists them all


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    cfg = params.prepare
    outputs = paths.OUTPUTS["prepare"]
    with staged(*outputs) as temps:
        staged_path = dict(zip(outputs, temps, strict=True))
        scratch = temps[0].parent / "decoded.npy"  # removed with the staging folder
        data = load(cfg, scratch)
        manifest, report, parts = assemble(cfg, params.seed, data)
        for split in paths.SPLITS:
            images, labels = staged_path[paths.images(split)], staged_path[paths.labels(split)]
            write_split(data["images"], data["labels"], parts[split], images, labels)
        hashes = {p.name: file_hashes(staged_path[p], "sha256", "md5") for p in paths.ARRAYS}
        manifest["sha256"] = {name: h["sha256"] for name, h in hashes.items()}
        manifest["md5"] = {name: h["md5"] for name, h in hashes.items()}  # as dvc.lock will record them
        staged_path[paths.MANIFEST].write_text(json_text(manifest))
        staged_path[paths.DATA_REPORT].write_text(json_text(report))
        write_plots(manifest, report, staged_path)
    skipped = len(report["skipped"])
    note = (
        f"; {skipped} bad file{'s' if skipped > 1 else ''} left out, listed in {paths.DATA_REPORT}" if skipped else ""
    )
    print(
        f"prepare: {manifest['sizes']} images of shape {manifest['input_shape']}, "
        f"{len(manifest['classes'])} classes{note}"
    )
    return {"manifest": str(paths.MANIFEST), "sizes": manifest["sizes"], "skipped": skipped}


def load(cfg, scratch: Path) -> dict:
    """Images (N, C, H, W) uint8 (in memory, or decoded into `scratch`), labels, classes and what went wrong."""
    root = Path(cfg.root)
    if cfg.dataset == "imagefolder":
        return load_folder(cfg, root, scratch)
    if cfg.dataset == "digits":
        arrays = sources.digits()
    else:
        arrays = sources.mnist(root, cfg.dataset == "fashion_mnist", cfg.download)

    channels = cfg.channels or arrays.images.shape[1]
    fitted = arrays.images
    if preprocess.changes(fitted.shape, channels, cfg.image_size):  # else no torch in this process (1.2-1.8 s)
        import torch

        fitted = preprocess.fit(torch.from_numpy(fitted), channels, cfg.image_size, cfg.resize).numpy()
    n = len(arrays.labels)
    h, w = arrays.images.shape[2:]
    return {
        "images": fitted,
        "labels": arrays.labels,
        "classes": arrays.classes,
        "max_value": arrays.max_value,
        "given_split": np.array(arrays.split) if arrays.split else None,
        "split_by": "source" if arrays.split else "pipeline",  # MNIST: its train and test sets
        "sizes": Counter({(int(w), int(h)): n}),
        "keep": np.ones(n, dtype=bool),
        "bad": {},
    }


def load_folder(cfg, root: Path, scratch: Path) -> dict:
    found = sources.scan_folder(root)
    channels = cfg.channels or 3
    n = len(found.files)
    if n == 0 and not found.problems:
        raise DataError(f"{root} holds no image files in its class folders")
    shape = (n, channels, cfg.image_size, cfg.image_size)
    out = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cfg.workers or (1 if n < SERIAL_BELOW else cores)
    results = sources.decode_folder(found, channels, cfg.image_size, cfg.resize, cfg.max_image_pixels, workers, out)
    out.flush()
    bad = dict(found.problems)
    keep = np.zeros(n, dtype=bool)
    sizes: Counter = Counter()
    first_of: dict[str, int] = {}
    for i, (rel, result) in enumerate(zip(found.files, results, strict=True)):
        if result.reason:
            bad[rel] = result.reason
            continue
        earlier = first_of.setdefault(result.sha256, i)
        if earlier != i and _leaks(found.split, earlier, i):
            bad[rel] = f"the same bytes as {found.files[earlier]}" + (
                f" (in {found.split[earlier]}/)" if found.split else ", which a split could put on the other side"
            )
            continue
        keep[i] = True
        sizes[(result.width, result.height)] += 1
    for folder in found.empty_classes:
        bad[folder] = "empty class folder: no images in it"
    return {
        "images": out,
        "labels": np.asarray(found.labels, dtype=np.int64),
        "classes": found.classes,
        "max_value": 255,
        "given_split": np.array(found.split) if found.split is not None else None,
        "split_by": "user" if found.split is not None else "pipeline",
        "sizes": sizes,
        "keep": keep,
        "bad": bad,
    }


def _leaks(split: list[str] | None, a: int, b: int) -> bool:
    """The same image twice is a leak when the copies can land in different splits."""
    return split is None or split[a] != split[b]


def assemble(cfg, seed: int, data: dict) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Decide what is kept and where it goes; the manifest and the report. Raises on bad data under `error`."""
    bad, classes, labels, keep = data["bad"], list(data["classes"]), data["labels"], data["keep"]
    if bad and cfg.on_bad_sample == "error":
        first = "; ".join(f"{path}: {why}" for path, why in sorted(bad.items())[:SHOWN])
        more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
        raise DataError(
            f"{len(bad)} bad file{'s' if len(bad) > 1 else ''} in {cfg.root}: {first}{more}; fix or remove "
            f"{'them' if len(bad) > 1 else 'it'}, or set prepare.on_bad_sample: skip to leave such files out "
            "(each is then listed in the data report)"
        )
    given = data["given_split"]
    if data["split_by"] == "user":  # a class with nothing to learn from is left out of val and test too
        trained = np.bincount(labels[keep & (given == "train")], minlength=len(classes))
        keep = keep & (trained[labels] > 0)
    counts = np.bincount(labels[keep], minlength=len(classes))
    if data["split_by"] == "pipeline" and (
        few := [(c, int(k)) for c, k in zip(classes, counts, strict=True) if 0 < k < 3]
    ):
        named = ", ".join(f"'{c}' ({k})" for c, k in few)
        raise DataError(
            f"classes with fewer than 3 usable images: {named}; a stratified split into train, val and test "
            "needs at least 3 of each class: add images, or remove the class folder"
        )
    dropped = [c for c, k in zip(classes, counts, strict=True) if k == 0]
    kept_classes = [c for c, k in zip(classes, counts, strict=True) if k > 0]
    if len(kept_classes) < 2:
        raise DataError(
            f"{cfg.root}: only {len(kept_classes)} class with usable images ({', '.join(kept_classes) or 'none'}); "
            "a classifier needs at least 2 class folders"
        )
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[[classes.index(c) for c in kept_classes]] = np.arange(len(kept_classes))
    new_labels = remap[labels]

    index = np.flatnonzero(keep)
    if data["split_by"] == "pipeline":
        inner = stratified_split(new_labels[index], cfg.val_fraction, cfg.test_fraction, seed)
        parts = {s: index[inner[s]] for s in paths.SPLITS}
    elif data["split_by"] == "user":
        parts = {s: index[given[index] == s] for s in paths.SPLITS}
    else:  # MNIST: its train set is split into train and val; its test set stays the test split
        train = index[given[index] == "train"]
        inner = stratified_split(new_labels[train], cfg.val_fraction, 0.0, seed)
        parts = {"train": train[inner["train"]], "val": train[inner["val"]], "test": index[given[index] == "test"]}
    for s in paths.SPLITS:
        if parts[s].size == 0:
            raise DataError(f"the {s} split is empty: put images in {cfg.root}/{s}/<class>/, or let the pipeline split")
    data["labels"] = new_labels
    data["classes"] = kept_classes
    mean, std = channel_stats(data["images"], parts["train"], data["max_value"])
    shape = list(data["images"].shape[1:])
    manifest = {
        "dataset": cfg.dataset,
        "root": None if cfg.dataset == "digits" else cfg.root,
        "classes": kept_classes,
        "input_shape": shape,
        "input_dtype": "uint8",
        "max_value": data["max_value"],
        "normalisation": {
            "scale": 1.0 / data["max_value"],
            "mean": [round(m, 8) for m in mean],
            "std": [round(s, 8) for s in std],
            "note": "x = (pixels * scale - mean) / std, per channel; the model does this itself",
        },
        # How an image file becomes these pixels (serve.preprocess.decode): the export hands it to serving.
        "preprocess": {
            "channels": shape[0],
            "size": shape[1],
            "resize": cfg.resize,
            "max_value": data["max_value"],
            "max_image_pixels": cfg.max_image_pixels,
        },
        "seed": seed,
        "counts": {
            s: dict(
                zip(kept_classes, np.bincount(new_labels[parts[s]], minlength=len(kept_classes)).tolist(), strict=True)
            )
            for s in paths.SPLITS
        },
        "sizes": {s: int(parts[s].size) for s in paths.SPLITS},
        "skipped": len(bad),
        "dropped_classes": dropped,
    }
    report = {
        "skipped": [{"file": path, "reason": why} for path, why in sorted(bad.items())],
        "dropped_classes": dropped,
        "counts": manifest["counts"],
        "original_sizes": [{"width": w, "height": h, "images": k} for (w, h), k in sorted(data["sizes"].items())],
    }
    return manifest, report, parts


def write_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, images_path: Path, labels_path: Path):
    out = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(index.size, *images.shape[1:]))
    step = rows_per_chunk(images)
    for start in range(0, index.size, step):
        out[start : start + step] = images[index[start : start + step]]
    out.flush()
    del out
    np.save(labels_path, labels[index].astype(np.int64))


def write_plots(manifest: dict, report: dict, staged_path: dict[Path, Path]) -> None:
    """Counts per class and split, the original sizes, and a grid of train samples per class."""
    rows = ["class,split,images"]
    rows += [f"{csv_cell(c)},{s},{k}" for s in paths.SPLITS for c, k in manifest["counts"][s].items()]
    staged_path[paths.DATA_COUNTS].write_text("\n".join(rows) + "\n")
    sizes = ["width,height,images"] + [f"{r['width']},{r['height']},{r['images']}" for r in report["original_sizes"]]
    staged_path[paths.DATA_SIZES].write_text("\n".join(sizes) + "\n")
    train_images, train_labels = staged_path[paths.images("train")], staged_path[paths.labels("train")]
    samples_grid(
        train_images, train_labels, manifest["classes"], manifest["max_value"], staged_path[paths.DATA_SAMPLES]
    )


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def samples_grid(
    images_path: Path, labels_path: Path, classes: list[str], max_value: int, out: Path, per_class: int = 8
):
    """One row per class of its first train images, at least 32 pixels each, the class's name at the row's start.

    Laid out as `torchvision.utils.make_grid` does (2-pixel grey borders), in numpy and Pillow:
    importing torchvision for this grid alone cost prepare about 1 s.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path)
    c, h, w = images.shape[1:]
    n_classes = len(classes)
    grid = np.zeros((n_classes * per_class, c, h, w), dtype=np.uint8)
    for k in range(n_classes):
        picked = np.flatnonzero(labels == k)[:per_class]
        grid[k * per_class : k * per_class + picked.size] = images[picked]
    if max_value != 255:
        grid = np.round(grid.astype(np.float32) * np.float32(255 / max_value)).astype(np.uint8)
    if c == 1:
        grid = grid.repeat(3, axis=1)
    if min(h, w) < 32:  # small images shown in big pixels, not blurred
        factor = -(-32 // min(h, w))
        grid = grid.repeat(factor, axis=2).repeat(factor, axis=3)
        h, w = h * factor, w * factor
    pad = 2
    picture = np.full((n_classes * (h + pad) + pad, per_class * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, tile in enumerate(grid):
        top, left = (i // per_class) * (h + pad) + pad, (i % per_class) * (w + pad) + pad
        picture[top : top + h, left : left + w] = tile.transpose(1, 2, 0)
    # The names in a column on the left, in PIL's built-in bitmap font: the same bytes on every
    # machine, but Latin-1 only (other characters show as "?").
    font = ImageFont.load_default_imagefont()
    names = [n if len(n) <= 20 else n[:18] + ".." for n in classes]
    # A name the font cannot write is shown by its index, so that two such rows stay apart.
    names = [n if n.isascii() or n.isprintable() and _latin1(n) else f"class {k}" for k, n in enumerate(names)]
    width = max(int(font.getlength(name)) for name in names) + 8
    image = Image.new("RGB", (width + picture.shape[1], picture.shape[0]), (255, 255, 255))
    image.paste(Image.fromarray(picture), (width, 0))
    draw = ImageDraw.Draw(image)
    row = (picture.shape[0] - 2) / n_classes
    for k, name in enumerate(names):
        left, top, right, bottom = font.getbbox(name)
        y = 2 + row * k + (row - 2 - (bottom - top)) / 2 - top
        draw.text((width - 4 - (right - left), round(y)), name, fill=(0, 0, 0), font=font)
    image.save(out, format="PNG")
