"""User errors: mistakes the user can fix (config, data, model, template, missing benchmark files, CLI misuse).

The CLI prints such an error's message alone and exits 2; its traceback goes to a log file (the run's folder
when the run got that far, else <state>/logs/), and `sftflow --debug` shows it on the terminal too.
Anything that is not a UserError is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

EXIT_USER_ERROR = 2
LOG_NAME = "error.log"
# `sftflow --debug`: tracebacks (and Prefect's own failure logs) on the terminal too.
DEBUG = bool(os.environ.get("SFTFLOW_DEBUG"))


class UserError(Exception):
    """An error whose message alone tells the user what to fix."""


def user_error_names() -> set[str]:
    """Class names of every UserError subclass loaded so far (Prefect's state messages name the class)."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def attach_run_dir(exc: BaseException, run_dir: Path) -> None:
    """Remember which run folder an error happened in, so its traceback is written there."""
    if not hasattr(exc, "sftflow_run_dir"):
        exc.sftflow_run_dir = str(run_dir)


def write_log(exc: BaseException, command: str) -> Path:
    """The full traceback (secrets scrubbed) in the run's folder, or in <state>/logs/ before a run exists."""
    from sftflow import env
    from sftflow.redact import scrub

    run_dir = getattr(exc, "sftflow_run_dir", None)
    if run_dir and Path(run_dir).is_dir():
        path = Path(run_dir) / LOG_NAME
    else:
        path = env.state_dir() / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{command or 'sftflow'}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(scrub(text) + "\n")
    return path
