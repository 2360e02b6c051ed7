"""Process environment: the project-local state directory and offline mode.

Must run before torch/transformers/prefect/mlflow are imported: several of them read these
variables once, at import time.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sftflow import prefect_db

# Variables that stop hub look-ups and telemetry (probed on this machine: with them, no outside calls).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow ignores DO_NOT_TRACK=1; it wants "true"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

# The shared data folder beside the repository: the default of data.root (training data) and of
# eval.benchmark_root (the MMLU/BBH originals), which are separate settings.
SHARED_DATA = "../shared/data"


# MLflow's HTTP client defaults (7 retries with backoff factor 2, 120 s timeout) spend ~4.5 minutes on an
# unreachable tracking server before a stage fails; a short budget fails within seconds, still riding out a blip.
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def state_dir() -> Path:
    """Where runs, models, Prefect's and MLflow's databases live (default ./.sftflow)."""
    return Path(os.environ.get("SFTFLOW_HOME", ".sftflow")).expanduser().resolve()


def default_tracking_uri(state: Path | None = None) -> str:
    return f"sqlite:///{(state or state_dir()) / 'mlflow.db'}"


def configure(offline: bool) -> Path:
    """Point Prefect and MLflow at the state directory and apply offline mode. Returns the state dir.

    Explicit environment wins: a user's PREFECT_HOME, PREFECT_API_URL or MLFLOW_TRACKING_URI is kept.
    """
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFTFLOW_HOME", str(state))
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(state))
    # A cold ephemeral Prefect server runs migrations first; the 20 s default is tight on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A run's own Prefect server would otherwise write a telemetry heartbeat into the state dir's database as it
    # starts: one more writer when runs overlap, besides a call outside the machine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(name, value)
    # Prefect's console handler, minus the tracebacks of user errors (the CLI prints their one-line message).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS",
                          "sftflow.prefect_console.QuietUserErrorsConsoleHandler")
    if offline:
        os.environ.update(OFFLINE_ENV)
    return state


def init_tracking_store() -> None:
    """Create (or upgrade) a local SQLite tracking database under a file lock. Two runs starting at once on a
    fresh database would both run MLflow's migrations, and one fails ("Online migration expected to match one
    row"). Once created, the store is cached for the process; busy writers then wait (MLflow's busy_timeout)."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _get_store

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the process dies, so a kill never blocks the next run
        _get_store()


def start_local_prefect() -> None:
    """Start this process's ephemeral Prefect server (none when PREFECT_API_URL names one) under a lock on the
    state dir's Prefect home. A server on a new database migrates it inside one long write transaction (about a
    minute on 2 cores), and another run's server connecting meanwhile fails "database is locked"; so the first run
    to take the lock starts and migrates, and the next starts once that server answers, on a database already
    migrated. A new database starts as a copy of a migrated template (prefect_db). Prefect's own client then reuses
    this server (one per process)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    home = Path(settings.home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server-start.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the process dies, so a kill never blocks the next run
        prefect_db.seed(prefect_db.database_path(settings))
        SubprocessASGIServer().start()

