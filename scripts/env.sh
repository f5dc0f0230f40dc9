# Sourced by the other scripts: builds (once) and activates the project's virtual environment.
# The environment is rebuilt only when requirements.lock changes; a stamp file holds the lock's hash.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

lock_hash="$(sha256sum requirements.lock | cut -d' ' -f1)"
if [ "$(cat "$VENV/.lock-sha256" 2>/dev/null)" != "$lock_hash" ]; then
  echo "setting up $VENV from requirements.lock (first time: a few minutes, about 6 GB)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "error: Python 3.11 is required (found $("$PYTHON" --version)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  # From scratch, so that nothing the lock no longer lists stays behind.
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  echo "$lock_hash" > "$VENV/.lock-sha256"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"

# Offline by default: no tool phones home.
export DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DVC_NO_ANALYTICS=1
# Loading a model through MLflow never unpickles (MLflow's default allows it; see README, Models in MLflow).
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
