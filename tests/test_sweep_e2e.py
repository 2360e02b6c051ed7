"""Sweeps through the real flow: every trial is a whole smoke pipeline run (tiny model, Prefect, MLflow on SQLite)
nested under the sweep's MLflow run; the Optuna study lives in SQLite beside it, so a killed sweep resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sftflow import env
from sftflow.configs.loader import load_config
from sftflow.release import registry
from sftflow.review import compare
from sftflow.sweeps import study as study_state
from sftflow.sweeps.space import every_trial, load_spec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "sweeps"
SMOKE = str(REPO / "configs" / "smoke.yaml")
CHEAP = '["eval.bbh.subtasks=[navigate]", eval.bbh.limit=1, eval.mmlu.limit=1]'  # fewer items per trial


def nested(sweep_run_id: str) -> list:
    client = MlflowClient()
    exp = client.get_run(sweep_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'")
    return sorted((r for r in runs if "sweep.trial" in r.data.params), key=lambda r: int(r.data.params["sweep.trial"]))


def nested_experiment(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


def study(cfg_overrides: list[str], space: Path):
    import optuna

    spec = load_spec(space)
    cfg = load_config(SMOKE, every_trial(spec, cfg_overrides))
    return optuna.load_study(study_name=study_state.study_name(cfg, spec),
                             storage=study_state.storage_url(env.state_dir()))


@pytest.mark.e2e
def test_a_2x2_grid_nests_four_trial_runs_and_reuses_the_data_and_base_benchmark_caches(prefect_server, data_root):
    from sftflow.flows.sweep import sweep

    result = sweep(config_file=SMOKE, space_file=str(FIXTURES / "grid.yaml"), overrides=[f"data.root={data_root}"])
    runs = nested(result["mlflow_run_id"])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.params["train.lora.r"], float(r.data.params["train.learning_rate"])) for r in runs} == \
        {("2", 1e-3), ("2", 3e-3), ("4", 1e-3), ("4", 3e-3)}  # every grid point once, as the trial's params
    for r in runs:
        assert {"sweep/gain", "sweep/worst_forgetting", "sweep/feasible", "sweep/passed", "sweep/trial"} <= \
            set(r.data.metrics)
        assert r.data.tags["sftflow.sweep"] == result["study"] and "sftflow.stage" not in r.data.tags
    for r in runs[1:]:  # after the first trial: data stages and the base model's benchmarks come from the caches
        m = r.data.metrics
        assert m["load/cache_hit"] == m["curate/cache_hit"] == m["split/cache_hit"] == 1.0
        assert m["eval/base/evaluated_tasks"] == 0 and m["eval/base/cached_tasks"] > 0
        assert m["eval/ft/evaluated_tasks"] > 0  # the trial's own model is evaluated
    sweep_run = MlflowClient().get_run(result["mlflow_run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.metrics["sweep/n_trials"] == 4
    assert {a.path for a in MlflowClient().list_artifacts(sweep_run.info.run_id)} == {"pareto.md", "pareto.png"}
    table = result["table"].splitlines()
    assert len(table) == 2 + 4 and result["front"] and Path(result["plot"]).is_file()
    gains = [r.data.metrics["sweep/gain"] for r in runs]
    assert max(gains) == pytest.approx(max(row["gain"] for row in result["results"]))
    # `sftflow compare` reads a sweep by its run id or its name: its trials side by side
    for ref in (result["mlflow_run_id"], result["study"]):
        assert {v.run_id for v in compare.views([ref])} == {r.info.run_id for r in runs}


@pytest.mark.e2e
def test_a_constrained_tpe_study_runs_four_trials_and_registers_the_best_as_challenger(prefect_server, data_root):
    from sftflow.flows.sweep import sweep

    # A lenient gate, so some trial passes and --register has a candidate; champion must not move.
    overrides = [f"data.root={data_root}", "gate.min_gain=-1", "gate.max_forgetting.mmlu=1",
                 "gate.max_forgetting.bbh=1", "name=smoke-tpe"]
    result = sweep(config_file=SMOKE, space_file=str(FIXTURES / "tpe.yaml"), overrides=overrides, register_best=True)
    runs = nested(result["mlflow_run_id"])
    assert len(runs) == 4 and [r.data.params["sweep.trial"] for r in runs] == ["0", "1", "2", "3"]
    trials = study(overrides, FIXTURES / "tpe.yaml").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert all(t.user_attrs["constraints"] and all(c <= 0 for c in t.user_attrs["constraints"]) for t in trials)
    assert all(1e-4 <= t.params["train.learning_rate"] <= 3e-3 and t.params["train.lora.r"] in (2, 4, 6, 8)
               for t in trials)
    best = result["best"]
    assert best["gain"] == max(t.value for t in trials)
    version = MlflowClient().get_model_version_by_alias("smoke-tpe", registry.CHALLENGER)
    assert str(version.version) == str(result["registered_version"]) and version.tags["mlflow.parent_run_id"] == \
        best["run_id"]
    assert registry.champion("smoke-tpe") is None  # the sweep proposes; a human promotes
    # its verdict is the best trial's whole gate, with the champion it faced (none here: the base only)
    reasons = json.loads(version.tags["gate.reasons"])
    assert reasons[0].startswith("best of sweep ") and any(r.startswith("held-out ") and " gain: " in r for r in reasons)
    assert version.tags["gate.passed"] == "true" and version.tags["sftflow.judged_against"] == "base"


@pytest.mark.e2e
def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(prefect_server, data_root, tmp_path):
    from sftflow.flows.sweep import sweep

    space = tmp_path / "crash.yaml"
    space.write_text("sampler: grid\nparams:\n  model.base: [no-such-model, tiny-random-llama]\n"
                     f"concurrency: 2\noverrides: {CHEAP}\n")  # two trials at once: each subflow in its thread
    result = sweep(config_file=SMOKE, space_file=str(space), overrides=[f"data.root={data_root}", "name=smoke-crash"])
    states = {r["params"]["model.base"]: r["state"] for r in result["results"]}
    assert states == {"no-such-model": "FAIL", "tiny-random-llama": "COMPLETE"}
    crashed = next(r for r in result["results"] if r["state"] == "FAIL")
    assert crashed["error"] and crashed["trial"] not in result["front"]
    statuses = {r.data.params["model.base"]: r.info.status for r in nested(result["mlflow_run_id"])}
    assert statuses == {"no-such-model": "FAILED", "tiny-random-llama": "FINISHED"}
    assert MlflowClient().get_run(result["mlflow_run_id"]).data.metrics["sweep/n_failed"] == 1


@pytest.mark.e2e
def test_a_killed_sweep_resumes_without_redoing_finished_trials(prefect_server, data_root, tmp_path):
    from optuna.trial import TrialState

    from sftflow.flows.sweep import sweep

    space = tmp_path / "resume.yaml"
    space.write_text(f"sampler: grid\nparams:\n  train.lora.r: [2, 6]\noverrides: {CHEAP}\n")
    overrides = [f"data.root={data_root}", "name=smoke-resume"]
    proc = subprocess.Popen([sys.executable, "-m", "sftflow.cli", "sweep", SMOKE, str(space),
                             *(a for o in overrides for a in ("--set", o))], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sweep.log", "w"))
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # the first trial finished and the second one's pipeline run started
            try:
                running = study(overrides, space)
            except KeyError:  # the study does not exist yet
                running = None
            trials = running.get_trials() if running else []
            if [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING] and MlflowClient().search_runs(
                    [nested_experiment(running.user_attrs[study_state.RUN_ID])], filter_string=(
                        f"tags.mlflow.parentRunId = '{running.user_attrs[study_state.RUN_ID]}' "
                        "and attributes.status = 'RUNNING'")):
                break
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the first trial did not finish in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = trials[0]

    result = sweep(config_file=SMOKE, space_file=str(space), overrides=overrides)
    assert result["ran"] == 1  # only the killed trial, redone
    trials = study(overrides, space).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs[study_state.STALE] and trials[2].params == trials[1].params
    assert trials[0].user_attrs[study_state.RUN_ID] == first.user_attrs[study_state.RUN_ID]
    runs = nested(result["mlflow_run_id"])  # the same sweep run, reopened
    assert {r.data.params["sweep.trial"]: r.info.status for r in runs} == {"0": "FINISHED", "2": "FINISHED"}
    killed = MlflowClient().search_runs([runs[0].info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' and attributes.status = 'KILLED'"))
    assert len(killed) == 1  # the killed trial's pipeline run, closed by the next run
    assert [r["trial"] for r in result["results"]] == [0, 2]


@pytest.mark.e2e
def test_a_pruned_trial_stops_before_evaluation_and_the_sweep_finishes_the_other(prefect_server, data_root, tmp_path):
    from sftflow.flows.sweep import sweep
    from sftflow.hooks import PRUNED_TAG

    # Deterministic: any loss is above 0, but nothing is pruned before step 3. max_steps 2 validates at step 2
    # only and completes; max_steps 6 validates at 2, then at 4, where it is pruned.
    space = tmp_path / "prune.yaml"
    space.write_text("sampler: grid\nparams:\n  train.max_steps: [2, 6]\n"
                     "pruner: {type: threshold, max_val_loss: 0.0, n_warmup_steps: 3}\n"
                     f"overrides: [train.eval_steps=2, {CHEAP[1:]}\n")
    overrides = [f"data.root={data_root}", "name=smoke-prune"]
    result = sweep(config_file=SMOKE, space_file=str(space), overrides=overrides)
    trials = {t.params["train.max_steps"]: t for t in study(overrides, space).get_trials()}
    assert {k: t.state.name for k, t in trials.items()} == {2: "COMPLETE", 6: "PRUNED"}
    assert sorted(trials[6].intermediate_values) == [2, 4] and trials[6].user_attrs["pruned"]["step"] == 4
    client = MlflowClient()
    runs = {int(r.data.params["train.max_steps"]): r for r in nested(result["mlflow_run_id"])}
    assert runs[2].info.status == "FINISHED" and runs[6].info.status == "KILLED"
    assert runs[6].data.tags[PRUNED_TAG].startswith("pruned at step 4: validation loss")
    assert runs[6].data.tags[study_state.STATE_TAG] == "pruned"
    assert runs[2].data.tags[study_state.STATE_TAG] == "complete"
    stages = {r.data.tags["sftflow.stage"]: r.info.status for r in client.search_runs(
        [runs[6].info.experiment_id], f"tags.mlflow.parentRunId = '{runs[6].info.run_id}'")}
    assert stages == {"model": "FINISHED", "load": "FINISHED", "curate": "FINISHED", "split": "FINISHED",
                      "template": "FINISHED", "train": "KILLED"}  # no heldout, benchmarks, gate or report
    row = next(line for line in result["table"].splitlines() if line.startswith(f"| {trials[6].number} |"))
    assert "PRUNED" in row and trials[6].number not in result["front"]
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    assert metrics["sweep/n_pruned"] == 1 and metrics["sweep/n_failed"] == 0 and metrics["sweep/n_trials"] == 2
    views = {v.run_id: v for v in compare.views([result["study"]])}  # compare shows it, marked pruned
    assert set(views) == {runs[2].info.run_id, runs[6].info.run_id}
    assert views[runs[6].info.run_id].pruned.startswith("pruned at step 4")
    assert views[runs[2].info.run_id].pruned is None
    assert ("pruned", [views[r].pruned for r in views]) in compare.table(list(views.values()))[1]


def test_the_train_hook_reaches_a_task_in_a_subflow_and_a_pruned_task_fails_only_that_subflow(prefect_server):
    from prefect import flow, task

    from sftflow import hooks

    @task
    def stage():
        if "prune" in hooks.train_callbacks.get():
            raise hooks.TrainingPruned("pruned at step 1")
        return hooks.train_callbacks.get()

    @flow
    def pipeline():
        return stage()

    @flow
    def caller():
        states = {}
        for value in ("keep", "prune"):  # as flows/sweep.py sets it around each trial's pipeline
            token = hooks.train_callbacks.set((value,))
            try:
                states[value] = pipeline(return_state=True)
            finally:
                hooks.train_callbacks.reset(token)
        return {k: (s.is_completed(), s.result(raise_on_failure=False)) for k, s in states.items()}

    out = caller()
    assert out["keep"] == (True, ("keep",))
    assert out["prune"][0] is False and isinstance(out["prune"][1], hooks.TrainingPruned)
