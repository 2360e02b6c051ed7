"""Prefect's console log handler, minus the noise of user errors, with secrets scrubbed.

Prefect logs a failing task and flow with full tracebacks, then their failed states; for a user error
(sftflow.errors.UserError) that is 40-60 lines on the terminal before the CLI's one-line message, and a pruned
training (sftflow.hooks.TrainingPruned) is no error at all. This handler drops those records from the terminal
only: Prefect's API handler still sends them to the Prefect UI, and the CLI writes the traceback to the run's log
file. env.configure installs it through Prefect's own setting
PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS; `sftflow --debug` shows everything.
"""

from __future__ import annotations

import logging
import re

from prefect.logging.handlers import PrefectConsoleHandler

from sftflow import errors, hooks
from sftflow.redact import scrub


def is_user_error_record(record: logging.LogRecord) -> bool:
    """A record about a user error, or about a training pruned on purpose (sftflow.hooks: an outcome the sweep
    reports in one line of its own)."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, (errors.UserError, hooks.TrainingPruned)):
        return True
    if record.levelno < logging.INFO or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
        return False
    # "Finished in state Failed('Task run encountered an exception DataError: ...')" carries no exception object.
    names = "|".join(map(re.escape, sorted({*errors.user_error_names(), hooks.TrainingPruned.__name__})))
    return bool(re.search(rf"encountered an exception:? (?:{names}):", record.getMessage()))


class QuietUserErrorsConsoleHandler(PrefectConsoleHandler):
    def emit(self, record: logging.LogRecord) -> None:
        if not errors.DEBUG and is_user_error_record(record):
            return
        if getattr(self.stream, "closed", False):  # a temporary server stopping at exit, after stdout closed
            return
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
