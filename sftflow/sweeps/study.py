"""A sweep's state: its Optuna study (SQLite beside the MLflow store, so a killed sweep resumes) and its MLflow
parent run, under which every trial's pipeline run is nested.

A trial records who runs it (host, pid); a trial left RUNNING by a process that is gone is marked FAIL on the
next start and its parameters are queued again, so it is redone; a trial that crashed or was scored stays
finished and counts towards n_trials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sftflow import cache
from sftflow.sweeps.pareto import UNMEASURED
from sftflow.sweeps.space import SweepSpec, pruner, sampler
from sftflow.tracking import finite_metrics, host, open_experiment, owner_gone

STORAGE_FILE = "optuna.db"
STALE, RUN_ID = "sftflow.stale", "mlflow_run_id"
STATE_TAG = "sftflow.sweep_state"
SCORE_KEYS = ("gain", "worst_forgetting", "feasible", "passed")


def study_name(cfg, spec: SweepSpec) -> str:
    """Same config and space -> same study, so rerunning a sweep resumes it."""
    return f"{cfg.name}-sweep-{cache.key(spec.digest(), cfg.digest())[:10]}"


def storage_url(state: Path) -> str:
    return f"sqlite:///{state / STORAGE_FILE}"


def constraints(trial) -> list[float]:
    """TPE's constraints: each benchmark's drop beyond the gate's allowance (<= 0 feasible)."""
    return trial.user_attrs.get("constraints", [UNMEASURED])


def open_study(name: str, spec: SweepSpec, state: Path):
    """The study `name`, created or loaded (maximise the held-out gain, forgetting as constraints)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url(state))
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                               sampler=sampler(spec, constraints), pruner=pruner(spec))


def requeue_stale(study) -> list[int]:
    """Trials left RUNNING by a killed process on this host -> FAIL (tagged stale) with their parameters queued
    again; -> their numbers."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if owner_gone(t.user_attrs)]
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, STALE, True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"redo_of": t.number}, skip_if_exists=False)
    return [t.number for t in stale]


def finished(study) -> list:
    """Trials that count towards n_trials: scored, pruned or crashed; not those redone after a kill."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get(STALE)]


def claim(trial) -> None:
    """Mark the trial as run by this process (tracking.process_tags' keys, read back by owner_gone)."""
    trial.set_user_attr("sftflow.host", host())
    trial.set_user_attr("sftflow.pid", str(os.getpid()))


def records(study) -> list[dict]:
    """Each counted trial as {trial, params, state, run_id, gain, worst_forgetting, feasible, passed, error}."""
    out = []
    for t in sorted(finished(study), key=lambda t: t.number):
        out.append({"trial": t.number, "params": dict(t.params), "state": t.state.name,
                    "run_id": t.user_attrs.get(RUN_ID), "error": t.user_attrs.get("error"),
                    **{k: t.user_attrs.get(k) for k in SCORE_KEYS}})
    return out


def sweep_run(study, cfg, spec: SweepSpec, state: Path, config_file: str) -> tuple[str, str]:
    """The sweep's MLflow parent run (reopened when the study already has one) -> (run id, experiment id)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = open_experiment(cfg, state)
    tags = {"sftflow.sweep": study.study_name, "sftflow.host": host(), "sftflow.pid": str(os.getpid())}
    if run_id := study.user_attrs.get(RUN_ID):
        try:
            if client.get_run(run_id).info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                for key, value in tags.items():
                    client.set_tag(run_id, key, value)
                return run_id, exp_id
        except MlflowException:
            pass  # deleted from the store: start a new one
    run = client.create_run(exp_id, run_name=study.study_name, tags=tags)
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in {
        "sweep.config_file": config_file, "sweep.sampler": spec.sampler, "sweep.n_trials": spec.trials(),
        "sweep.space": json.dumps(spec.model_dump(mode="json")["params"]),
        "sweep.overrides": json.dumps(spec.overrides), "sweep.study": study.study_name}.items()])
    study.set_user_attr(RUN_ID, run.info.run_id)
    return run.info.run_id, exp_id


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def record_trial(trial_run_id: str, number: int, study_name: str, params: dict, scored: dict | None,
                 state: str) -> None:
    """On the trial's pipeline run: its sweep params, tags (state: complete, pruned, fail) and `sweep/*` metrics."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(trial_run_id, "sftflow.sweep", study_name)
    client.set_tag(trial_run_id, "sftflow.sweep_trial", str(number))
    client.set_tag(trial_run_id, STATE_TAG, state)
    client.log_batch(trial_run_id, params=[_param("sweep.trial", number),
                                           _param("sweep.params", json.dumps(params, sort_keys=True))])
    values = {"sweep/trial": number, **({f"sweep/{k}": float(v) if isinstance(v, bool) else v
                                         for k, v in scored.items() if k in SCORE_KEYS} if scored else {})}
    now = int(time.time() * 1000)
    client.log_batch(trial_run_id, metrics=[Metric(k, v, now, 0) for k, v in finite_metrics(values).items()])
