"""MLflow runs whose process was killed hard (SIGKILL) are closed as KILLED by the next run on the host."""

import os
import signal
import subprocess
import sys

from mlflow.tracking import MlflowClient

from sftflow.tracking import close_orphans, ensure_experiment, process_tags

OPEN_AND_DIE = """
import os, signal, mlflow
from sftflow.tracking import process_tags
run = mlflow.start_run(experiment_id={exp!r}, tags=process_tags())
print(run.info.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_runs_of_killed_processes_are_marked_killed_and_others_left_running():
    exp = ensure_experiment("orphans", None)
    proc = subprocess.run([sys.executable, "-c", OPEN_AND_DIE.format(exp=exp)], capture_output=True, text=True,
                          env=os.environ, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    client = MlflowClient()
    killed = proc.stdout.strip()
    assert client.get_run(killed).info.status == "RUNNING"  # what a SIGKILL leaves behind
    live = client.create_run(exp, tags=process_tags()).info.run_id  # this process: alive
    elsewhere = client.create_run(exp, tags={"sftflow.host": "another-host", "sftflow.pid": "999999"}).info.run_id

    assert close_orphans(exp) == [killed]
    assert client.get_run(killed).info.status == "KILLED"
    assert {client.get_run(r).info.status for r in (live, elsewhere)} == {"RUNNING"}
    assert close_orphans(exp) == []


def test_experiments_open_in_mlflows_model_training_view(tmp_path):
    import mlflow

    from sftflow.tracking import EXPERIMENT_KIND, ensure_experiment

    fresh = ensure_experiment(f"kind-{tmp_path.name}", None)
    old = mlflow.create_experiment(f"old-{tmp_path.name}")  # made before sftflow tagged experiments
    ensure_experiment(f"old-{tmp_path.name}", None)
    for exp_id in (fresh, old):
        assert mlflow.get_experiment(exp_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_runs_logging_one_dataset_at_once_all_succeed_and_share_one_row():
    """MLflow's SQL store checks for a dataset then inserts it: runs racing on one dataset must not fail."""
    import threading

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput

    from sftflow.tracking import unique_race_retry

    exp = ensure_experiment("dataset-race", None)
    client = MlflowClient()
    dataset = mlflow.data.from_pandas(pd.DataFrame({"x": [1, 2, 3]}), source="/data/train.jsonl", name="train")
    entity = DatasetInput(dataset._to_mlflow_entity())
    runs = [client.create_run(exp).info.run_id for _ in range(6)]
    barrier, errors = threading.Barrier(len(runs)), []

    def log(run_id):
        barrier.wait()
        try:
            unique_race_retry(lambda: client.log_inputs(run_id, datasets=[entity]))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    digests = {i.dataset.digest for r in runs for i in client.get_run(r).inputs.dataset_inputs}
    assert digests == {dataset.digest}


def test_a_stage_is_its_plain_function_with_a_task_of_its_name():
    """`@stage` keeps the typed function a reader and a tool see; the flow calls its `.task`."""
    import inspect

    from prefect import Task

    from sftflow.tasks.data import curate, load, split
    from sftflow.tasks.evaluation import benchmarks, gate, heldout, report
    from sftflow.tasks.training import resolve_base, run, template

    stages = {load.load: "load", curate.curate: "curate", split.split: "split", template.template: "template",
              resolve_base.resolve_model: "model", run.run_training: "train", heldout.heldout: "heldout",
              benchmarks.benchmarks: "benchmarks", gate.gate: "gate", report.report: "report"}
    for fn, name in stages.items():
        assert inspect.isfunction(fn) and "out_dir" in inspect.signature(fn).parameters, name
        assert isinstance(fn.task, Task) and fn.task.name == fn.stage == name
    assert run.run_training.task.retries == 2
