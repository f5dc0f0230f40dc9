"""Batch scoring: every image of a folder through the exported model, into one predictions file.

    python -m flows.score data/incoming                    # predictions/incoming.csv
    python -m flows.score data/incoming --output predictions/today.json --top-k 3
    python -m flows.score data/incoming --model models:/classifier@champion

A Prefect flow: `load model` (checked as `serve.model` checks it: a bad model fails here, before
any image is read), one `score` task per batch of files, and `write`, which writes the predictions
(`serve.predict`'s rows: file, class, probability, top-k, error) whole or not at all. A file that
cannot be scored is a row with its error, not a failed run. The run logs the counts and timings
and leaves them, with the files that failed, as the artifact `score-summary` in the Prefect UI.
Deployed as `score` (prefect.yaml), with a nightly schedule to switch on once images arrive.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from tasks.errors import DataError, InputError, OutputError

OUT = Path("predictions")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.score", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the images to score (every file under it; hidden ones left out)")
    p.add_argument("--output", help="the predictions file, .csv or .json (default: predictions/<folder name>.csv)")
    p.add_argument(
        "--model", help="an export folder, a .ts or .pt2 file, or models:/<name>@<alias> (default: the last export)"
    )
    p.add_argument("--top-k", type=int, default=1, help="also the next K-1 classes (default 1)")
    p.add_argument("--batch-size", type=int, default=256, help="files per scoring task (default 256)")
    return p


def output_for(folder: str, output: str | None) -> Path:
    return Path(output) if output else OUT / f"{Path(folder).resolve().name}.csv"


def check_args(folder: str, output: str | None, top_k: int, batch_size: int) -> Path:
    """The predictions file's path, once the arguments are known to be usable."""
    if not Path(folder).is_dir():
        raise InputError(f"{folder} is not a folder: put the images to score there, or pass the folder that holds them")
    if top_k < 1 or batch_size < 1:
        raise InputError(f"--top-k ({top_k}) and --batch-size ({batch_size}) must be at least 1")
    out = output_for(folder, output)
    if out.suffix.lower() not in (".csv", ".json"):
        raise InputError(f"{out}: the predictions file must end in .csv or .json")
    return out


if __name__ == "__main__":
    # Answer --help and refuse bad arguments before the imports below, which take seconds.
    from flows.server import ensure_server
    from tasks.cli import user_errors

    ARGS = parser().parse_args()
    with user_errors():
        check_args(ARGS.folder, ARGS.output, ARGS.top_k, ARGS.batch_size)
        ensure_server()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import logs  # noqa: E402
from serve import predict  # noqa: E402

logs.install(logs.PrefixFormatter())


@task(name="load model", task_run_name="load model", cache_policy=NO_CACHE)
def load_model(model: str | None):
    from serve.model import ModelError, load

    try:
        loaded = load(model)
    except ModelError as exc:
        raise InputError(str(exc)) from None
    get_run_logger().info(f"model {loaded.file} ({loaded.format}, sha256 {loaded.sha256[:12]})")
    return loaded


@task(name="score", task_run_name="score files {first}-{last}", cache_policy=NO_CACHE)
def score_batch(model, items: list, top_k: int, first: int, last: int) -> list[dict]:
    return predict.score(model, [(i.name, functools.partial(predict.read, i)) for i in items], top_k)


@task(name="write", task_run_name="write {out}", cache_policy=NO_CACHE)
def write(rows: list[dict], out: Path, top_k: int) -> None:
    text = predict.to_json(rows) if out.suffix.lower() == ".json" else predict.to_csv(rows, top_k)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        predict.write_atomic(out, text)
    except OSError as exc:
        raise OutputError(f"cannot write {out} ({exc.strerror or exc}); nothing was written") from None


def summary(folder: str, out: Path, model, rows: list[dict], seconds: dict[str, float]) -> dict:
    failed = [r for r in rows if "error" in r]
    total = sum(seconds.values())
    return {
        "folder": folder,
        "output": str(out),
        "model": str(model.file),
        "model_sha256": model.sha256,
        "files": len(rows),
        "scored": len(rows) - len(failed),
        "failed": len(failed),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "images_per_s": round(len(rows) / total, 1) if total else None,
        "failures": failed,
    }


def cell(text: str) -> str:
    """Text as one markdown table cell: a `|` or a backtick in a file name must not break the table."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def report(result: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [
        f"**{result['scored']} of {result['files']} files scored** from `{result['folder']}` into "
        f"`{result['output']}` by `{result['model']}` (sha256 `{result['model_sha256'][:12]}`).",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in result["seconds"].items()),
    ]
    if result["failures"]:
        lines += ["", f"{result['failed']} could not be scored:", "", "| file | error |", "|---|---|"]
        lines += [f"| {cell(r['file'])} | {cell(r['error'])} |" for r in result["failures"][:50]]
        if result["failed"] > 50:
            lines.append(f"| ... | {result['failed'] - 50} more, in the predictions file |")
    create_markdown_artifact("\n".join(lines), key="score-summary", description="What the scoring run did")


@flow(name="score", flow_run_name="score {folder}", log_prints=True)
def score(
    folder: str = "data/incoming",
    output: str | None = None,
    model: str | None = None,
    top_k: int = 1,
    batch_size: int = 256,
) -> dict:
    """Score every file under `folder` with `model` (default: the last export) into `output`."""
    logger = get_run_logger()
    out = check_args(folder, output, top_k, batch_size)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model)
    seconds["load model"] = time.perf_counter() - start

    start = time.perf_counter()
    items = predict.collect([folder])
    if not items:
        raise DataError(f"{folder} holds no files to score")
    top_k = min(top_k, len(loaded.classes))
    rows: list[dict] = []
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        rows += score_batch(loaded, batch, top_k, first + 1, first + len(batch))
    seconds["score"] = time.perf_counter() - start

    start = time.perf_counter()
    write(rows, out, top_k)
    seconds["write"] = time.perf_counter() - start
    result = summary(folder, out, loaded, rows, seconds)
    report(result)
    logger.info(
        f"score: {result['scored']} of {result['files']} files scored into {out} in {sum(seconds.values()):.2f} s "
        f"({result['images_per_s']} files/s; load {seconds['load model']:.2f} s, score {seconds['score']:.2f} s)"
        + (f"; {result['failed']} could not be, their error column says why" if result["failed"] else "")
    )
    return {k: v for k, v in result.items() if k != "failures"}


def main(args: argparse.Namespace) -> None:
    from tasks.cli import stop_on_sigterm, user_errors

    stop_on_sigterm()
    with user_errors():
        score(folder=args.folder, output=args.output, model=args.model, top_k=args.top_k, batch_size=args.batch_size)


if __name__ == "__main__":
    main(ARGS)
