#!/usr/bin/env bash
# The MLflow UI on the project's tracking store, bound to this machine only:
#
#   bash scripts/mlflow-ui.sh [--port 5000]
#
# then open the link it prints: the runs list with the main params and metrics as columns (a
# saved view); one run per pipeline run, with params, per-epoch curves, test metrics, plots and
# the logged models.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
port=5000
previous=""
for arg in "$@"; do
  if [ "$previous" = "--port" ] || [ "$previous" = "-p" ]; then port="$arg"; fi
  case "$arg" in --port=*) port="${arg#--port=}" ;; esac
  previous="$arg"
done
MLFLOW_UI_URL="${MLFLOW_UI_URL:-http://127.0.0.1:$port}" \
  python -c 'from tasks.tracking import runs_list_link; print("MLflow UI: open", runs_list_link())' || true
exec mlflow ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --host 127.0.0.1 "$@"
