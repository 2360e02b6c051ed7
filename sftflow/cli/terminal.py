"""The terminal every command prints to, and what a run shows on it.

During a run the terminal gets one line per finished stage (its status, duration and key figures), warnings and
errors; everything else (library progress bars and prints, the Trainer's log dicts, Python warnings, Prefect's
INFO lines) goes to the run's log file, `<run dir>/run.log`. `sftflow --verbose` shows everything as it comes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

# Logs and CI have no terminal: rich would fold tables to 80 columns and cut the CIs.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

VERBOSE = False  # `sftflow --verbose` / `--debug`: no run log, everything on the terminal
LOG_NAME = "run.log"
STAGE_LOGGERS = ("prefect.task_runs", "sftflow.stages")  # where tracking.log_summary's records come from
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_prefect() -> None:
    """Prefect's console handler at WARNING for this process unless verbose, its INFO lines at exit included
    (RunOutput still logs them to run.log). Prefect reads the setting when it is first imported."""
    import os

    if not VERBOSE:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _console_for(stream) -> Console:
    return Console(file=stream, width=None if stream.isatty() else 200)


def stage_line(stage: dict) -> Text:
    """`✓ train         6.4 s  6 steps, final loss 6.194` (`cached` after the duration on a cache hit)."""
    return Text.assemble(("✓ ", "green"), (f"{stage['stage']:<11}", "bold"), f"{stage['duration_s']:6.1f} s  ",
                         ("cached  ", "blue") if stage["cache_hit"] else "", stage["summary"])


class StageLines(logging.Handler):
    """Prints the stage summaries tracking.log_summary logs (records carrying `sftflow_stage`) as progress lines."""

    def __init__(self, out: Console):
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        if (stage := getattr(record, "sftflow_stage", None)) is not None:
            self.out.print(stage_line(stage), soft_wrap=True)


def _console_handlers() -> list[logging.Handler]:
    """Prefect's console handler (root, uvicorn and fastapi share it)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    return [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]


class LastFrameWriter(io.TextIOBase):
    """The run log's stdout and stderr, keeping only the last frame of a line redrawn with carriage returns: tqdm
    redraws its bars several times a second, which made run.log mostly half-drawn bars. A bar still running is
    written as it stands once a minute, so `tail -f run.log` shows progress."""

    SNAPSHOT_S = 60.0

    def __init__(self, log, clock=time.monotonic):
        self.log, self.clock = log, clock
        self.pending = ""  # the unfinished line's last frame
        self.written_at = clock()

    @property
    def encoding(self) -> str:  # tqdm draws unicode bars only into a stream that says it takes them
        return self.log.encoding

    def fileno(self) -> int:  # code writing to the descriptor itself bypasses the collapsing, as before
        return self.log.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.log.write(last_frame(line) + "\n")
        self.pending = last_frame(self.pending)
        now = self.clock()
        if lines:
            self.written_at = now
        elif self.pending and now - self.written_at >= self.SNAPSHOT_S:
            self.log.write(self.pending + "\n")
            self.written_at = now
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def close(self) -> None:
        if self.pending:
            self.log.write(self.pending + "\n")
            self.pending = ""
        super().close()


def last_frame(line: str) -> str:
    """What a terminal would show of `line`: the text after its last carriage return (the last non-empty one)."""
    return next((frame for frame in reversed(line.split("\r")) if frame), "")


class RunOutput:
    """`with RunOutput("run") as out: ...; out.run_dir = ...`: the quiet terminal of one run.

    Until the run's folder is known the log lives in `<state>/logs/`; on exit it moves into the run folder (set
    `run_dir`, or a user error names it), beside `error.log`. Verbose mode changes nothing."""

    def __init__(self, command: str):
        from sftflow import env

        self.run_dir: str | None = None
        self.log_path = env.state_dir() / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{id(self):x}.log"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunOutput:
        from sftflow import env

        if not VERBOSE:
            self._quiet()
        env.start_local_prefect()  # runs starting at once on one state dir start their Prefect servers in turn
        return self

    def _quiet(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self._stack.enter_context(self.log_path.open("a", encoding="utf-8", buffering=1))
        lines = StageLines(_console_for(sys.stdout))  # the terminal, before stdout is redirected
        file_handler = logging.StreamHandler(log)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self._add(logging.getLogger(), file_handler)
        stage_logger = logging.getLogger(STAGE_LOGGERS[1])
        if stage_logger.getEffectiveLevel() > logging.INFO:  # stages called outside Prefect log here
            level = stage_logger.level
            stage_logger.setLevel(logging.INFO)
            self._stack.callback(stage_logger.setLevel, level)
        for name in STAGE_LOGGERS:
            self._add(logging.getLogger(name), lines)
        for handler in _console_handlers():  # Prefect's INFO lines only in the log
            self._stack.callback(handler.setLevel, handler.level)
            handler.setLevel(max(handler.level, logging.WARNING))
        stream = self._stack.enter_context(contextlib.closing(LastFrameWriter(log)))
        self._stack.enter_context(contextlib.redirect_stdout(stream))  # prints, Trainer dicts
        # progress bars (tqdm writes to sys.stderr) and Python warnings (library deprecations)
        self._stack.enter_context(contextlib.redirect_stderr(stream))

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._stack.callback(logger.removeHandler, handler)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stack.close()
        run_dir = self.run_dir or getattr(exc, "sftflow_run_dir", None)
        if VERBOSE or not run_dir or not Path(run_dir).is_dir() or not self.log_path.exists():
            return
        target = Path(run_dir) / LOG_NAME
        shutil.move(self.log_path, target)
        self.log_path = target

