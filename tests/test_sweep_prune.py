"""Pruning sweep trials on validation loss: the space file's pruner, the Trainer callback against a real Optuna
study and a real training of the tiny model, what a pruned training leaves (no cache entry, KILLED MLflow runs),
the hook crossing Prefect's flow -> subflow -> task calls, and a quiet console."""

import logging

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from sftflow import cache, hooks
from sftflow.configs.training import TrainConfig
from sftflow.sweeps import prune
from sftflow.sweeps import space
from sftflow.prefect_console import is_user_error_record
from sftflow.tasks.training.run import STAGE, run_training, training_key
from sftflow.tracking import RunContext, run_stage

SPACE = "params: {train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3}}\n"
# Evaluated at steps 3 and 6: the tiny model's validation loss stays near 6.2 on these records.
CFG = {"method": "lora", "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, "max_steps": 6,
       "batch_size": 4, "eval_steps": 3, "logging_steps": 3}


def load(tmp_path, text: str) -> space.SweepSpec:
    (tmp_path / "space.yaml").write_text(text)
    return space.load_spec(tmp_path / "space.yaml")


def test_the_pruner_defaults_to_median_for_searches_and_none_for_grids(tmp_path):
    assert load(tmp_path, f"n_trials: 3\n{SPACE}").pruner.type == "median"
    assert load(tmp_path, "sampler: grid\nparams: {train.lora.r: [2, 4]}\n").pruner.type == "none"
    spec = load(tmp_path, f"n_trials: 3\npruner: {{type: median, n_startup_trials: 2, n_warmup_steps: 4}}\n{SPACE}")
    median = space.pruner(spec)
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_startup_trials == 2
    assert median._n_warmup_steps == 4
    assert isinstance(space.pruner(load(tmp_path, f"n_trials: 3\npruner: none\n{SPACE}")), optuna.pruners.NopPruner)
    threshold = space.pruner(load(tmp_path, f"n_trials: 3\npruner: {{type: threshold, max_val_loss: 2.5}}\n{SPACE}"))
    assert threshold._lower == -2.5  # trials report -loss: a loss above 2.5 is a value below -2.5
    # The pruner is not part of the study's identity: changing it resumes the same study.
    assert load(tmp_path, f"n_trials: 3\npruner: none\n{SPACE}").digest() == \
        load(tmp_path, f"n_trials: 3\n{SPACE}").digest()
    with pytest.raises(space.SweepError, match="pruner"):
        load(tmp_path, f"n_trials: 3\npruner: hyperband\n{SPACE}")
    with pytest.raises(space.SweepError, match="max_val_loss"):
        load(tmp_path, f"n_trials: 3\npruner: threshold\n{SPACE}")


def study_with_one_finished_trial(loss: float):
    """An in-memory study maximising, whose one finished trial reported -loss at steps 3 and 6."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.add_trial(create_trial(params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2)},
                                 value=0.1, intermediate_values={3: -loss, 6: -loss}))
    return study


def train_trial(study, token_paths, model, out_dir):
    """One trial of `study`: the real training stage, with the trial's reporter set as sftflow's hook."""
    trial = study.ask({"lr": FloatDistribution(1e-4, 1e-2)})
    reporter = prune.val_loss_reporter(trial)
    cfg = TrainConfig(**CFG, learning_rate=trial.params["lr"])
    token = hooks.train_callbacks.set((reporter,))
    try:
        return trial, reporter, cfg, run_training(token_paths, model, cfg, out_dir)
    finally:
        hooks.train_callbacks.reset(token)


def test_a_trial_worse_than_the_median_stops_at_its_first_validation_and_caches_nothing(tmp_path, token_paths,
                                                                                       tiny_model):
    study = study_with_one_finished_trial(loss=1.0)  # a trial far better than the tiny model's ~6.2
    with pytest.raises(hooks.TrainingPruned, match="pruned at step 3: validation loss 6"):
        train_trial(study, token_paths, tiny_model, tmp_path)
    trial = study.trials[-1]
    assert list(trial.intermediate_values) == [3] and -7 < trial.intermediate_values[3] < -5
    key = training_key(token_paths, tiny_model, TrainConfig(**CFG, learning_rate=trial.params["lr"]))
    assert cache.lookup(STAGE, key) is None and not cache.entry(STAGE, key).exists()  # no entry, no checkpoints
    assert not (tmp_path / "adapter").exists()


def test_a_trial_better_than_the_median_trains_to_the_end_and_reports_each_validation_once(tmp_path, token_paths,
                                                                                          tiny_model):
    study = study_with_one_finished_trial(loss=100.0)
    trial, reporter, cfg, result = train_trial(study, token_paths, tiny_model, tmp_path)
    assert reporter.pruned is None and result["metrics"]["train/steps"] == 6
    # steps 3 and 6; the stage's final evaluate() (the best model, at step 6 again) is not reported twice
    assert sorted(study.trials[-1].intermediate_values) == [3, 6] and reporter.reported == {3, 6}
    assert cache.lookup(STAGE, training_key(token_paths, tiny_model, cfg)) is not None


def test_a_pruned_stage_ends_its_run_and_the_parent_killed_with_the_reason(tmp_path):
    def pruned_stage(out_dir):
        raise hooks.TrainingPruned("pruned at step 4: validation loss 6.2")

    exp = mlflow.set_experiment("prune-unit").experiment_id
    with pytest.raises(hooks.TrainingPruned):  # as tracking.parent_run wraps the pipeline's stages
        with mlflow.start_run(run_name="pipeline") as parent, hooks.pruned_run_ends_killed():
            run_stage("train", pruned_stage, RunContext(run_dir=str(tmp_path), parent_run_id=parent.info.run_id,
                                                        experiment_id=exp))
    client = MlflowClient()
    stage = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")[0]
    for run in (stage, client.get_run(parent.info.run_id)):
        assert run.info.status == "KILLED" and run.data.tags[hooks.PRUNED_TAG].startswith("pruned at step 4")


def test_prefect_console_drops_the_records_of_a_pruned_training():
    def record(name: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None) if exc else None)

    assert is_user_error_record(record("prefect.task_runs", "Task run failed with exception",
                                       hooks.TrainingPruned("pruned at step 4: validation loss 6.2")))
    assert is_user_error_record(record("prefect.flow_runs", "Finished in state Failed('Flow run encountered an "
                                                            "exception: TrainingPruned: pruned at step 4')"))
    assert not is_user_error_record(record("prefect.task_runs", "Task run failed", RuntimeError("a real bug")))
