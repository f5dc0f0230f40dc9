"""Run one step of the pipeline: `python -m tasks STAGE`. This is what dvc.yaml's stages call.

    python -m tasks train                          # the train step on params.yaml
    python -m tasks train --set train.epochs=5     # with an override (DVC will not know of it)

Params are validated before torch, MLflow or the step's code is imported, so `--help` and a bad
key answer at once, and a bad key changes no file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tasks import STAGES, USER_ERRORS, run_stage
from tasks.params import PARAMS_FILE, ConfigError, load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tasks",
        description="Run one pipeline step. `dvc repro` runs them all, in order, when their inputs change.",
    )
    p.add_argument("stage", choices=STAGES, help="the step to run")
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set train.lr=0.01 (repeatable)",
    )
    return p


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        params = load(args.params, args.overrides)
    except ConfigError as exc:
        fail(str(exc), code=2)
    try:
        run_stage(
            args.stage, params, args.params, tags={"orchestrator": "dvc" if os.environ.get("DVC_STAGE") else "cli"}
        )
    except FileNotFoundError as exc:
        fail(str(exc))
    except Exception as exc:
        if type(exc).__name__ in USER_ERRORS:
            fail(f"{args.stage}: {exc}")
        raise


if __name__ == "__main__":
    main()
