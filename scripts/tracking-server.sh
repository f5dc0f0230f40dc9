#!/usr/bin/env bash
# A shared MLflow tracking server for a team: runs, metrics and the registry in PostgreSQL, artifacts
# (models, plots) kept by the server itself, which proxies them, so clients need no storage access:
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow bash scripts/tracking-server.sh
#
# then, wherever the pipeline runs:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Settings, from the environment:
#   MLFLOW_BACKEND_STORE_URI       the PostgreSQL database, which must exist (required); its tables are
#                                  made on the first start
#   MLFLOW_ARTIFACTS_DESTINATION   where the server keeps artifacts: a folder (default: mlartifacts/ in
#                                  this checkout) or a bucket (s3://...)
#   MLFLOW_HOST                    127.0.0.1 by default: this machine only. Serve other machines only with
#                                  authentication on (extra argument --app-name basic-auth; README,
#                                  "A shared tracking server")
#   MLFLOW_PORT                    5000 by default
#   MLFLOW_WORKERS                 1 by default (enough for a few users; 500 MB, starts in 5 s)
# Extra arguments go to `mlflow server` as they are (for example --app-name basic-auth).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
case " $* " in
  *" -h "* | *" --help "*) sed -n '2,/^source/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
uri="${MLFLOW_BACKEND_STORE_URI:-}"
if [ -z "$uri" ]; then
  echo "error: set MLFLOW_BACKEND_STORE_URI to the PostgreSQL database, e.g. postgresql://mlflow:PASSWORD@db-host:5432/mlflow" >&2
  exit 2
fi
case "$uri" in
  postgresql://* | postgresql+*://*) ;;
  *) echo "warning: MLFLOW_BACKEND_STORE_URI is not a PostgreSQL URL: a team server belongs on PostgreSQL" >&2 ;;
esac
host="${MLFLOW_HOST:-127.0.0.1}"
case "$host $*" in
  "127.0.0.1"* | "localhost"* | "::1"* | *"--app-name basic-auth"* | *"--app-name=basic-auth"*) ;;
  *) echo "warning: serving $host without authentication: anyone who reaches it can read and delete runs; add --app-name basic-auth (README)" >&2 ;;
esac
port="${MLFLOW_PORT:-5000}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$ROOT/mlartifacts}"
# The server's background job runner (huey consumers; for GenAI features this project does not use)
# costs 2 GB and 7 s of start-up.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
shown="$uri"
case "$uri" in *@*) shown="${uri%%://*}://${uri#*@}" ;; esac  # not the password
echo "MLflow tracking server on http://$host:$port: runs in $shown, artifacts in $artifacts"
exec mlflow server --backend-store-uri "$uri" --serve-artifacts --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}" "$@"
