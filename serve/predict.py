"""The exported model's answers for image files, as CSV or JSON.

    python -m serve.predict photo.jpg scans/ 'more/**/*.png'       # CSV on stdout
    python -m serve.predict scans/ --top-k 3 --format json --output predictions.json
    python -m serve.predict scans/ --model models:/classifier@champion

PATHS are image files, folders (every file under them in sorted order, leaving out what prepare
leaves out: hidden files, Thumbs.db, desktop.ini, __MACOSX) or globs (`**` reaches into
subfolders; quote them so that the shell leaves them to this command).
Each image is decoded and resized as the model's training images were (`model.json`'s
`preprocess`, `serve.preprocess`), whatever its size, mode or format. The model is the project's
last export unless `--model` names another (see `serve.model`).

One row per file, in the order given: `file`, `class`, `probability`, the next classes with
`--top-k`, and `error`. A file that cannot be scored (not an image, corrupt, over the pixel
limit, empty, missing) gets its reason in `error` and the other files are still scored. The
output file is written whole or not at all (a temporary file, then a rename).

Exit status: 0 every file scored; 3 some could not be (their rows say why; the output is
complete); 4 the model cannot be used; 9 the output cannot be written; 2 a wrong argument.
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("csv", "json")
MAX_FILE_BYTES = 256 << 20  # no image under the pixel limit is this large; a video or an archive is
GLOB_CHARS = set("*?[")


@dataclass
class Item:
    """A file to score, as the user named it; `error` when it cannot even be read."""

    name: str
    path: Path | None = None
    error: str = ""


def _folder(folder: Path) -> Iterator[Item]:
    from serve.preprocess import ignored  # as prepare: no hidden files, no Thumbs.db

    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not ignored(d))
        for name in sorted(filenames):
            if not ignored(name):
                path = Path(dirpath) / name
                yield Item(str(path), path)


def collect(paths: list[str]) -> list[Item]:
    """Every file the paths name, in order; a path that names nothing is an item with an error."""
    from serve.preprocess import ignored

    items: list[Item] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            items += _folder(path)
        elif path.is_file():
            items.append(Item(raw, path))
        elif GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            for match in matches:
                m = Path(match)
                if m.is_file() and not ignored(m.name):
                    items.append(Item(match, m))
                elif m.is_dir() and not raw.endswith("**"):
                    items += _folder(m)
            if not matches:
                items.append(Item(raw, error="no file matches this pattern"))
        elif path.exists():
            items.append(Item(raw, error="not a regular file (a pipe, socket or device)"))
        else:
            items.append(Item(raw, error="no such file or folder"))
    # A file named twice (a folder and a glob inside it, `**` matching a folder and its files) is scored once.
    seen: set[str] = set()
    unique = []
    for item in items:
        key = os.path.realpath(item.path) if item.path else f"?{item.name}"
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def read(item: Item) -> bytes | str:
    """The file's bytes, or why they cannot be read (too large to be an image we would accept, for one)."""
    if item.error:
        return item.error
    try:
        size = item.path.stat().st_size
        if size > MAX_FILE_BYTES:
            return f"{size:,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image file"
        return item.path.read_bytes()
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    except MemoryError:
        return "too large to read in the memory available"


def score(model, named: list[tuple[str, Any]], top_k: int = 1, max_pixels: int | None = None) -> list[dict]:
    """One row per (name, data) in order: class, probability and top-k, or the error.

    `data` is the file's bytes, the reason it has none (a str), or a function returning either:
    files are then read one at a time, each decoded before the next is read. Shared by this
    command, the batch-scoring flow and the HTTP server.
    """
    rows: list[dict] = [{"file": name} for name, _ in named]
    images, where = [], []
    for i, (_, data) in enumerate(named):
        if callable(data):
            data = data()
        decoded = model.decode(data, max_pixels) if isinstance(data, bytes) else None
        if decoded is None or decoded.image is None:
            rows[i]["error"] = data if decoded is None else decoded.reason
        else:
            images.append(decoded.image)
            where.append(i)
    if images:
        import numpy as np

        probs = model.probabilities(np.stack(images))
        k = min(top_k, probs.shape[1])
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for row, p, order in zip((rows[i] for i in where), probs, best, strict=True):
            top = [{"class": model.classes[c], "probability": round(float(p[c]), 6)} for c in order]
            row.update(top[0])
            row["top_k"] = top
    return rows


def to_csv(rows: list[dict], top_k: int) -> str:
    out = io.StringIO()
    header = ["file", "class", "probability"]
    for n in range(2, top_k + 1):
        header += [f"class_{n}", f"probability_{n}"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*header, "error"])
    for row in rows:
        cells = [row["file"]]
        top = row.get("top_k", [])
        for n in range(top_k):
            cells += [top[n]["class"], f"{top[n]['probability']:.6f}"] if n < len(top) else ["", ""]
        writer.writerow([*cells, row.get("error", "")])
    return out.getvalue()


def to_json(rows: list[dict]) -> str:
    """A JSON list with one row per line: readable, and each line is one file for `grep`."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` whole, or `path` untouched: a temporary file beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # surrogateescape: a file name that is not UTF-8 is written back as the bytes it has on disk
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.predict",
        description="Predict the classes of image files with the exported model.",
        epilog="Exit status: 0 all scored, 3 some files could not be (see their error column), "
        "4 the model cannot be used, 9 the output cannot be written.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    parser.add_argument(
        "--model", help="an export folder, a .ts or .pt2 file, or models:/<name>@<alias> (default: models/export)"
    )
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="also the next K-1 classes (default 1)")
    parser.add_argument("--format", choices=FORMATS, help="csv or json (default: from --output's suffix, else csv)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write here instead of stdout (atomically)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    parser.add_argument("--max-image-pixels", type=int, help="refuse bigger images (default: the training limit)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.max_image_pixels is not None and args.max_image_pixels < 1):
        parser.error("--top-k, --batch-size and --max-image-pixels must be at least 1")
    if args.format is None:
        args.format = "json" if args.output and args.output.suffix.lower() == ".json" else "csv"
    if args.output and not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: the folder {args.output.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from serve.model import ModelError, load

    started = time.perf_counter()
    items = collect(args.paths)
    if not items:
        print(f"error: {' '.join(args.paths)} holds no files to score", file=sys.stderr)
        return 3
    try:
        model = load(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    top_k = min(args.top_k, len(model.classes))
    rows: list[dict] = []
    for start in range(0, len(items), args.batch_size):
        batch = items[start : start + args.batch_size]
        rows += score(model, [(i.name, functools.partial(read, i)) for i in batch], top_k, args.max_image_pixels)
    text = to_csv(rows, top_k) if args.format == "csv" else to_json(rows)
    if args.output:
        try:
            write_atomic(args.output, text)
        except OSError as exc:
            print(f"error: cannot write {args.output} ({exc.strerror or exc}); nothing was written", file=sys.stderr)
            return 9
    else:
        sys.stdout.write(text)
    failed = sum("error" in r for r in rows)
    seconds = time.perf_counter() - started
    print(
        f"predict: {len(rows) - failed} of {len(rows)} files scored in {seconds:.2f} s by {model.file} "
        f"({model.format})" + (f"; {failed} could not be, their error column says why" if failed else ""),
        file=sys.stderr,
    )
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
