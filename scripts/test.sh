#!/usr/bin/env bash
# The one command that runs every check: ruff lint and format, then the whole test suite,
# slow end-to-end tests included (real dvc repro, real Prefect server, real MLflow store).
#
#   bash scripts/test.sh                 # everything (.ci/run runs exactly this)
#   bash scripts/test.sh -m "not slow"   # the fast tests only; extra arguments go to pytest
#
# First time: builds .venv from requirements.lock, as scripts/pipeline.sh does.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check .
ruff format --check .
python -m pytest "$@"
