"""The whole pipeline as one Prefect flow: prepare, build, train, evaluate, export.

    python -m flows.pipeline                         # run what is out of date
    python -m flows.pipeline --set train.lr=0.01     # override params (written to params.yaml)
    python -m flows.pipeline --force                 # run every step

Each step is a Prefect task named like its DVC stage, calling the same function as
`dvc repro`, in this one process. Inside a DVC repository the flow asks DVC which stages are
stale, runs only those, and commits each one it ran to `dvc.lock` and the DVC cache, so a flow
run is versioned exactly like a `dvc repro` and a `dvc repro` after it has nothing to do.
Overrides are validated, then written into params.yaml (as `dvc exp run -S` does), so the file
says what the run uses and DVC judges staleness from the same values.

Set PREFECT_API_URL to use a running Prefect server (`scripts/pipeline.sh` starts one);
without it Prefect starts a temporary one for this process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tasks import STAGES, run_stage
from tasks.cli import add_params_arguments, load_or_exit, user_errors
from tasks.params import PARAMS_FILE, ConfigError, load, write_overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    add_params_arguments(
        p, set_help="override a param and write it to the params file, e.g. --set train.lr=0.01 (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="run every step, even those DVC finds up to date")
    return p


if __name__ == "__main__":
    # Answer --help and reject bad params before the imports below, which take seconds.
    ARGS = parser().parse_args()
    load_or_exit(ARGS.params, ARGS.overrides)

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402


def step(stage: str, params_path: str, tags: dict[str, str]) -> dict:
    """One pipeline step; takes and returns paths and small summaries, never tensors."""
    path = Path(params_path)
    return run_stage(stage, load(path), path, tags)


# One Prefect task per stage, named like the stage. Inputs are paths, so nothing to cache.
STEP_TASKS = {stage: task(step, name=stage, task_run_name=stage, cache_policy=NO_CACHE) for stage in STAGES}


def open_dvc() -> Any:
    """The DVC repository of the working directory, or None outside one."""
    if not Path(".dvc").is_dir():
        return None
    import logging

    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)  # the flow reports its own commits
    return Repo(".")


@flow(name="pipeline", log_prints=True)
def pipeline(params_path: str = str(PARAMS_FILE), overrides: list[str] | None = None, force: bool = False) -> dict:
    """Run the stale steps in order (all of them with `force`); return what each step returned."""
    path = Path(params_path)
    repo = open_dvc()
    tags = {"orchestrator": "prefect", "prefect.flow_run_id": str(flow_run.id)}
    results: dict[str, Any] = {}
    try:
        if repo is not None and path.resolve() != (Path(repo.root_dir) / PARAMS_FILE).resolve():
            raise ConfigError(
                f"--params {path}: in a DVC repository the params are {PARAMS_FILE}, which dvc.lock records; "
                "edit it or use --set"
            )
        # Checked here too, for a deployment's parameters, before anything runs.
        if overrides:
            write_overrides(path, overrides)
        else:
            load(path)
        for stage in STAGES:
            if repo is not None and not force and not repo.status(targets=[stage]):
                print(f"{stage}: up to date")
                results[stage] = "up to date"
                continue
            results[stage] = STEP_TASKS[stage](stage, params_path, tags)
            if repo is not None:
                repo.commit(stage, force=True)
                print(f"{stage}: committed to dvc.lock")
    finally:
        if repo is not None:
            repo.close()
    return results


def summary() -> str:
    """Where the results are, for the end of a run."""
    from tasks.evaluate import METRICS
    from tasks.export import INFO
    from tasks.tracking import RUN_FILE

    if not METRICS.exists() or not INFO.exists():
        return "no results yet"
    test = json.loads(METRICS.read_text())["test"]
    run = json.loads(RUN_FILE.read_text())
    return "\n".join(
        [
            f"test accuracy {test['accuracy']:.4f}, macro F1 {test['f1_macro']:.4f}  ({METRICS}; `dvc metrics show`)",
            f"exported model: {INFO.parent}/  (model.ts TorchScript, model.pt2 torch.export, "
            f"model_state.pt state dict; how to apply it: {INFO})",
            "plots: plots/confusion.png, plots/train.csv  (`dvc plots show` writes dvc_plots/index.html)",
            f"MLflow run {run['run_id']} in {run['tracking_uri']}",
            "MLflow UI: bash scripts/mlflow-ui.sh, then open http://127.0.0.1:5000",
        ]
    )


def main(args: argparse.Namespace) -> None:
    with user_errors():
        pipeline(params_path=str(args.params), overrides=args.overrides or None, force=args.force)
    print(summary())


if __name__ == "__main__":
    main(ARGS)
