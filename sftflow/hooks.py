"""What a caller can add around a pipeline run without the stages knowing it: extra Trainer callbacks (a sweep's
pruner), and the way such a callback stops a training on purpose.

`train_callbacks` is read by the trainer builder of an in-process training (tasks/training/trainer.py); set it
around the pipeline call. Prefect runs a directly called task in the caller's thread and context, so the value
reaches the train stage (tests/test_sweep_e2e.py). Trainings launched as `accelerate` worker processes do not
see it: no callback runs there.

A callback that raises `TrainingPruned` ends the training: its work folder is dropped (nothing cached), the stage
and pipeline MLflow runs end KILLED with the tag `sftflow.pruned` (the reason), the later stages do not run, and
Prefect's console shows no traceback for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

train_callbacks: ContextVar[tuple] = ContextVar("sftflow_train_callbacks", default=())

PRUNED_TAG = "sftflow.pruned"


class TrainingPruned(Exception):
    """A training stopped on purpose by a callback (a sweep trial the pruner gave up on): an outcome, not an
    error. The message says why (validation loss and step)."""


@contextlib.contextmanager
def pruned_run_ends_killed() -> Iterator[None]:
    """Inside an active MLflow run: a TrainingPruned ends that run KILLED with the PRUNED_TAG, then goes on up."""
    try:
        yield
    except TrainingPruned as exc:
        import mlflow

        mlflow.set_tag(PRUNED_TAG, str(exc)[:5000])
        mlflow.end_run("KILLED")
        raise
