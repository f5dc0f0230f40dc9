#!/usr/bin/env bash
# The MLflow UI on the project's tracking store, bound to this machine only:
#
#   bash scripts/mlflow-ui.sh [--port 5000]
#
# then open http://127.0.0.1:5000: one run per pipeline run, with params, per-epoch curves,
# test metrics, plots and the logged TorchScript model.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec mlflow ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --host 127.0.0.1 "$@"
