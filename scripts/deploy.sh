#!/usr/bin/env bash
# Scheduled retraining, set up: the Prefect server (PREFECT_API_URL's, else the project's local one,
# started if it is down), the process work pool `pipeline`, and the deployments of prefect.yaml.
#
#   bash scripts/deploy.sh     # then keep a worker running: bash scripts/worker.sh
#
# Again after editing prefect.yaml (a schedule, a parameter): it updates the deployments.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PREFECT_API_URL="$(python -m flows.server)/api"
export PREFECT_API_URL
prefect work-pool inspect pipeline >/dev/null 2>&1 || prefect work-pool create pipeline --type process
prefect --no-prompt deploy --all
