#!/usr/bin/env bash
# The one command that sets everything up and runs the whole pipeline:
#
#   bash scripts/pipeline.sh [--set train.lr=0.01] [--force]
#
# First time: builds .venv from requirements.lock (hashed, a few minutes), then runs the Prefect
# flow, which starts a local Prefect server in the background (state in .prefect/, reused by
# every later run), runs every DVC stage that is out of date and logs one MLflow run to
# sqlite:///mlflow.db. Run again, it reuses all of that and redoes only what changed. Extra
# arguments go to `python -m flows.pipeline`; its exit code is this script's (see tasks/errors.py).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
git rev-parse --git-dir >/dev/null 2>&1 \
  || { echo "error: $ROOT is not a git repository; DVC needs one: clone the project with git" >&2; exit 1; }
start=$(date +%s)
status=0
python -m flows.pipeline "$@" || status=$?
case " $* " in *" -h "*|*" --help "*) ;; *) echo "pipeline wall time: $(( $(date +%s) - start )) s" ;; esac
exit "$status"
