"""Prefect flows: the pipeline (`python -m flows.pipeline`)."""
