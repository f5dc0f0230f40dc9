#!/usr/bin/env bash
# A Prefect worker for the `pipeline` work pool: it runs the flow runs that the deployments of
# prefect.yaml schedule, or that you trigger, each as a process in this checkout. Stays in the
# foreground (Ctrl-C stops it); run it under systemd or tmux to keep it.
#
#   bash scripts/worker.sh
#   prefect deployment run pipeline/retrain --param 'overrides=["train.lr=0.01"]'   # by hand
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PREFECT_API_URL="$(python -m flows.server)/api"
export PREFECT_API_URL
exec prefect worker start --pool pipeline "$@"
