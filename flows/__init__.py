"""Prefect flows over the steps in `tasks/`. Importing `tasks` first turns every tool's telemetry off."""

import tasks  # noqa: F401
