# Sourced by scripts/pipeline.sh: points PREFECT_API_URL at a local Prefect server, starting one
# in the background if none answers. One long-lived server instead of a temporary one per
# process saves 9-14 s per run. Its state (SQLite) lives in .prefect/; stop it with
# `PREFECT_HOME=.prefect .venv/bin/prefect server stop`.
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
if [ -z "${PREFECT_API_URL:-}" ]; then
  PREFECT_PORT="${PREFECT_PORT:-4200}"
  export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
  prefect_healthy() {
    python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
      "$PREFECT_API_URL" >/dev/null 2>&1
  }
  if ! prefect_healthy; then
    echo "starting a local Prefect server on 127.0.0.1:$PREFECT_PORT (state in $PREFECT_HOME)"
    mkdir -p "$PREFECT_HOME"
    prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off --background >/dev/null
    for _ in $(seq 1 120); do prefect_healthy && break; sleep 1; done
    prefect_healthy || { echo "error: the Prefect server did not answer on $PREFECT_API_URL within 120 s; see $PREFECT_HOME" >&2; exit 1; }
  fi
fi
