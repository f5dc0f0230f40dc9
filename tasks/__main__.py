"""Run one step of the pipeline: `python -m tasks STAGE`. This is what dvc.yaml's stages call.

    python -m tasks train                          # the train step on params.yaml
    python -m tasks train --set train.epochs=5     # with an override (DVC will not know of it)

Params are validated before torch, MLflow or the step's code is imported, so `--help` and a bad
key answer at once, and a bad key changes no file. Run by hand, a step takes DVC's lock on the
checkout, so it never runs beside a `dvc repro` or a pipeline flow. Errors are one line and an
exit code (see `tasks/errors.py`).
"""

from __future__ import annotations

import argparse
import os

from tasks import STAGES, StepContext, run_stage
from tasks.cli import add_params_arguments, checkout_lock, load_or_exit, stop_on_sigterm, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tasks",
        description="Run one pipeline step. `dvc repro` runs them all, in order, when their inputs change.",
    )
    p.add_argument("stage", choices=STAGES, help="the step to run")
    add_params_arguments(p, set_help="override a param, e.g. --set train.lr=0.01 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    params = load_or_exit(args.params, args.overrides)
    stop_on_sigterm()
    if args.stage == "export":
        from tasks import checker

        checker.start_ahead()  # the export's fresh process imports torch beside this one, on the other core
    orchestrator = "dvc" if os.environ.get("DVC_STAGE") else "cli"
    with user_errors(prefix=f"{args.stage}: "), checkout_lock():
        run_stage(args.stage, params, StepContext(args.params, {"orchestrator": orchestrator}))


if __name__ == "__main__":
    main()
