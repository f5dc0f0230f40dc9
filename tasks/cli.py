"""What the two command lines (`python -m tasks`, `python -m flows.pipeline`) share.

Light on purpose: nothing here imports torch, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from tasks.params import PARAMS_FILE, ConfigError, Params, load

# The steps' own errors: expected failures whose message is written for the user.
USER_ERRORS = ("ConfigError", "DataError", "TrainingError", "ExportError", "TrackingError")


def add_params_arguments(parser: argparse.ArgumentParser, set_help: str) -> None:
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_or_exit(path: Path, overrides: list[str]) -> Params:
    """Validated params, or exit 2 with the one-line message."""
    try:
        return load(path, overrides)
    except ConfigError as exc:
        fail(str(exc), code=2)


@contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
    """Expected failures end the program with their message, not a traceback."""
    try:
        yield
    except FileNotFoundError as exc:
        fail(f"{prefix}{exc}")
    except Exception as exc:
        if type(exc).__name__ in USER_ERRORS:
            fail(f"{prefix}{exc}")
        raise
