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
# A store that exists but cannot be opened (made by another MLflow, unreadable) stops here, in one line.
MLFLOW_UI_URL="${MLFLOW_UI_URL:-http://127.0.0.1:$port}" python -c '
from tasks.cli import user_errors
from tasks.tracking import ui_link
with user_errors():
    print("MLflow UI: open", ui_link())
'
exec mlflow ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --host 127.0.0.1 "$@"
