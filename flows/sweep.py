"""A sweep: many trainings with different params, run side by side, and the best of them.

    python -m flows.sweep sweeps/lr.yaml                  # trials as parallel Prefect tasks
    python -m flows.sweep sweeps/lr.yaml --parallel 4     # at most 4 at once
    python -m flows.sweep sweeps/lr.yaml --dask           # on a local Dask cluster (prefect-dask)
    python -m flows.sweep sweeps/lr.yaml --dask tcp://scheduler:8786   # on a running Dask cluster
    python -m flows.sweep sweeps/lr.yaml --fresh          # forget this sweep's earlier trials

The sweep file names the params to vary, as a grid or as random draws (see `sweeps/lr.yaml` and
`sweeps/random.yaml`). Every trial is a Prefect task that runs build, train and evaluate in a
process and folder of its own (`flows/trial.py`), under `.sweeps/<name>-<key>/trial-<n>/`, on
params.yaml plus the sweep's values: params.yaml itself is never written, and the checkout's
outputs and dvc.lock are not touched. The trials share the prepared data, prepared once per
distinct `prepare` section. In MLflow the sweep is one parent run with a nested run per trial, so
the UI's compare view shows them side by side. A sweep stopped (Ctrl-C, SIGTERM, a crash) and
started again runs only the trials that have no result; a trial's training resumes from its
checkpoint. The best trial is picked by the sweep's metric (on the validation split by default:
picking by the test split would make its score optimistic), and printed with the command that
makes it the pipeline's params.

This module is the command line alone, and imports nothing heavy at its top: each trial process,
forked by multiprocessing (`flows/trial.py`), runs the main module again before its own code (as
`__mp_main__`), so whatever is imported here, every trial pays (Prefect's import, 0.7 s, did). The
sweep file and the plan it makes are `flows/sweep_plan.py`; the Prefect flow is `flows/sweep_flow.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.paths import PARAMS_FILE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="the sweep file, e.g. sweeps/lr.yaml")
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params the trials start from (%(default)s)")
    p.add_argument("--parallel", type=int, help="trials at once (default: the file's `parallel`, or up to 4 cores)")
    p.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the trials on Dask: a local cluster, or the scheduler at ADDRESS (tcp://host:8786)",
    )
    p.add_argument("--fresh", action="store_true", help="forget the trials this sweep finished before; run them all")
    return p


def main() -> None:
    args = parser().parse_args()  # --help before pydantic and the rest (a tenth of a second)
    from flows.server import ensure_server
    from flows.sweep_plan import make_plan
    from tasks.cli import user_errors
    from tasks.errors import ConfigError

    with user_errors():  # a bad sweep file is refused before the imports below, which take seconds
        if args.parallel is not None and args.parallel < 1:
            raise ConfigError(f"--parallel {args.parallel}: give 1 or more")
        plan = make_plan(args.sweep, args.params, args.parallel)
        ensure_server()
    if args.dask is None:
        from flows import trial

        trial.forkserver()  # the server that forks the trials imports from now on, beside Prefect's import below
    from flows import sweep_flow

    sweep_flow.main(args, plan)


if __name__ == "__main__":
    main()
