#!/usr/bin/env bash
# Wall time of the README's first command, from a fresh clone of HEAD:
#
#   bash benchmarks/pipeline_wall_time.sh
#
# Prints three numbers: the first `scripts/pipeline.sh` (environment, Prefect server, pipeline),
# the pipeline alone (`python -m flows.pipeline --force`, server already up) and a second
# `scripts/pipeline.sh` with nothing to do. The clone, its .venv (about 6 GB) and its Prefect
# server are removed at the end. Uses port 4299 so it does not meet a server on 4200.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
export PREFECT_PORT=4299
cleanup() {
  (cd "$work/clone" 2>/dev/null && PREFECT_HOME=.prefect .venv/bin/prefect server stop >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q "$src" "$work/clone"
cd "$work/clone"
seconds() { local t0; t0=$(date +%s%N); "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; echo $(( ($(date +%s%N) - t0) / 1000000000 )); }
first=$(seconds bash scripts/pipeline.sh)
alone=$(seconds env PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" .venv/bin/python -m flows.pipeline --force)
again=$(seconds bash scripts/pipeline.sh)
echo "first scripts/pipeline.sh: $first s"
echo "pipeline alone (--force): $alone s"
echo "second scripts/pipeline.sh: $again s"
