"""What the flows show in the terminal and the Prefect UI: one line per expected error, a short prefix per line."""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

from tasks.errors import PipelineError


class OneLineErrors(logging.Filter):
    """Our own errors, and interrupts, without a traceback: in the terminal and in the Prefect UI alike.

    Their message already says what is wrong and what to do. Prefect's "Engine execution exited
    with unexpected exception", which a worker's flow process adds, repeats the flow run's
    "Finished in state Failed(...)" line for them, and goes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError | KeyboardInterrupt):
            if record.msg == "Engine execution exited with unexpected exception":
                return False
            record.exc_info, record.exc_text = None, None
        return True


class ExpectedErrors(OneLineErrors):
    """In the terminal: also drop the "Finished in state Completed()" (or Skipped) line of each step.

    The step's own last line says how it ended (the Prefect UI still has both).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return False
        try:
            done = record.getMessage().startswith(("Finished in state Completed", "Finished in state Skipped"))
        except Exception:  # a malformed record: the handler reports it as logging does
            done = False
        return not (record.levelno == logging.INFO and done)


def install(formatter: logging.Formatter) -> None:
    """Our errors in one line everywhere; in the terminal, `formatter`'s lines and no "Finished in state Completed"."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # the records, before any handler (UI or terminal)
        if not any(isinstance(f, OneLineErrors) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(OneLineErrors())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            if not any(isinstance(f, ExpectedErrors) for f in handler.filters):
                handler.addFilter(ExpectedErrors())
            handler.setFormatter(formatter)


class PrefixFormatter(logging.Formatter):
    """`17:01:43 [trial 3] message`: the time, where the line comes from (see `where`), and the level when not INFO."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def where(self, record: logging.LogRecord) -> tuple[str, str]:
        """The prefix's text, and the message; by default the task run's name up to its colon, or the flow's name."""
        task = getattr(record, "task_run_name", None)
        label = task.split(":")[0] if task else getattr(record, "flow_name", None) or "flow"
        return label, record.getMessage()

    def format(self, record: logging.LogRecord) -> str:
        where, message = self.where(record)
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.formatTime(record, self.datefmt)} [{where}] {level}{message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
