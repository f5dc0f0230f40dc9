#!/usr/bin/env bash
# Wall time of the two example sweeps, in a fresh clone of REV (default HEAD) with this checkout's .venv:
#
#   bash benchmarks/sweep_wall_time.sh [REV]
#
# Runs `python -m flows.sweep sweeps/lr.yaml --fresh` (4 trials of 10 epochs, 2 at once) and
# `sweeps/random.yaml --fresh` (8 trials of 10 epochs) against a local Prefect server of the clone's
# own (port 4298), and prints each sweep's wall time and its trials' seconds (the table's column).
# Run it for two commits, one after the other, to compare them. The clone and its server are removed
# at the end.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rev="${1:-HEAD}"
work="$(mktemp -d)"
export PREFECT_PORT=4298
cleanup() {
  (cd "$work/clone" 2>/dev/null && .venv/bin/python -m flows.server --stop >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q "$src" "$work/clone"
cd "$work/clone"
git checkout -q "$rev"
ln -s "$src/.venv" .venv
source scripts/env.sh >/dev/null
python -m flows.server >/dev/null
echo "$(git log -1 --format='%h %cs') on $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M')"
for sweep in sweeps/lr.yaml sweeps/random.yaml; do
  t0=$(date +%s%N)
  python -m flows.sweep "$sweep" --fresh >"$work/out.txt" 2>&1 || { cat "$work/out.txt" >&2; exit 1; }
  wall=$(( ($(date +%s%N) - t0) / 100000000 ))
  trials=$(grep -E '│ (finished|best) ' "$work/out.txt" | awk -F'│' '{gsub(/ /, "", $(NF-2)); printf "%s ", $(NF-2)}')
  echo "$sweep: $((wall / 10)).$((wall % 10)) s; trials' seconds: $trials"
done
