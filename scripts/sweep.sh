#!/usr/bin/env bash
# Run a sweep: many trainings from a sweep file, in parallel, and the best of them.
#
#   bash scripts/sweep.sh sweeps/lr.yaml [--parallel N] [--dask [tcp://scheduler:8786]] [--fresh]
#
# Sets up .venv like scripts/pipeline.sh, and uses the same local Prefect server and MLflow store.
# The trials work under .sweeps/; params.yaml and the pipeline's outputs are left as they are.
# Extra arguments go to `python -m flows.sweep`; its exit code is this script's.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m flows.sweep "$@"
