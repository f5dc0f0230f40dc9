#!/usr/bin/env bash
# A retrain now, by hand, through the `retrain` deployment: a worker runs it (bash scripts/worker.sh).
#
#   bash scripts/retrain.sh                                  # as the schedule runs it
#   bash scripts/retrain.sh train.lr=0.01 train.epochs=50    # with overrides (written to params.yaml)
#   bash scripts/retrain.sh --force --watch                  # every step; wait for the end, exit 1 if it failed
#   bash scripts/retrain.sh --no-pull                        # without `dvc pull` from the DVC remote first
#
# Overrides are checked here against params.yaml before the run is created, then again by the flow.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
overrides=()
options=()
for arg in "$@"; do
    case "$arg" in
        --force) options+=(--param force=true) ;;
        --no-pull) options+=(--param pull=false) ;;
        --watch) options+=(--watch) ;;
        -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *=*) overrides+=("$arg") ;;
        *) echo "error: $arg: expected KEY=VALUE overrides, --force, --no-pull or --watch" >&2; exit 2 ;;
    esac
done
json="$(python - ${overrides[@]+"${overrides[@]}"} <<'PY'
import json, sys
from pathlib import Path

from tasks.cli import load_or_exit

load_or_exit(Path("params.yaml"), sys.argv[1:])
print(json.dumps(sys.argv[1:]))
PY
)"
PREFECT_API_URL="$(python -m flows.server)/api"
export PREFECT_API_URL
exec prefect deployment run pipeline/retrain --param "overrides=$json" ${options[@]+"${options[@]}"}
