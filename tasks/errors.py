"""The failures a user can cause or fix, each with a message written for them and an exit code.

Every entry point (`python -m tasks`, `python -m flows.pipeline`) prints such an error as one
line, `error: <message>`, and exits with its code; anything else is a bug and keeps its traceback.

    code  class           what happened
    1     (none)          a bug: a traceback follows
    2     ConfigError     params.yaml or an override is wrong
    3     DataError       the input data is unusable
    4     InputError      a file made by an earlier stage is missing or unreadable
    5     TrainingError   training stopped: diverging, stuck at chance, no CUDA
    6     ExportError     an exported model does not reproduce the eager model
    7     TrackingError   the MLflow store cannot be reached, written, or lacks the run
    8     BusyError       another run is using this checkout (a `dvc repro`, another flow)
    9     OutputError     an output cannot be written (disk full, no permission)
    10    ServerError     the Prefect server cannot be reached or started
    11    NotReproducedError  a reproduction differs from its run, or the run had uncommitted changes
    130   (Ctrl-C)        interrupted; the MLflow run is marked KILLED
    143   (SIGTERM)       terminated; the MLflow run is marked KILLED

Light on purpose: no torch, Prefect or MLflow here.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A failure whose message is meant for the user as-is: what is wrong and what to do."""

    exit_code = 1


class ConfigError(PipelineError):
    exit_code = 2


class DataError(PipelineError):
    exit_code = 3


class InputError(PipelineError):
    exit_code = 4


class TrainingError(PipelineError):
    exit_code = 5


class ExportError(PipelineError):
    exit_code = 6


class TrackingError(PipelineError):
    exit_code = 7


class BusyError(PipelineError):
    exit_code = 8


class OutputError(PipelineError):
    exit_code = 9


class ServerError(PipelineError):
    exit_code = 10


class NotReproducedError(PipelineError):
    exit_code = 11
