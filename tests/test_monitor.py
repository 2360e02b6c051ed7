"""Monitoring the champion on fresh labelled traffic: a planted drop starts a retrain flow run of the retrain
deployment (real Prefect test server) with the new data as a source; a champion that holds up is left alone.
Every check is an MLflow run and a step in the champion's LoggedModel metric history."""

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import deployed
from mlflow.tracking import MlflowClient
from test_registry import PASS, fp, pipeline_run

from sftflow.configs.loader import load_config
from sftflow.flows.monitor import monitor
from sftflow.stack.fence import admitted_traffic
from sftflow.release import registry
from sftflow.release.monitoring import MonitorError, judge, read_traffic
from sftflow.tasks.evaluation.heldout import generate

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [f"Question {i}: is {i} even? Answer yes or no." for i in range(20)]


@pytest.fixture(scope="module")
def deployments(prefect_server):
    """`sftflow deploy`'s deployments (retrain adhoc/nightly and monitor) on a real Prefect server."""
    with deployed("monitor-pool") as applied:
        yield applied


def champion_config(tmp_path) -> Path:
    """A champion whose held-out label_acc was 1.0 on 20 items, and its pipeline config file."""
    name = f"mon-{uuid.uuid4().hex[:8]}"
    registry.register_candidate(name, pipeline_run(tmp_path, metrics={"heldout/ft/label_acc": 1.0,
                                                                      "heldout/records": 20}), PASS, fp("a"), {})
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"root": str(tmp_path), "sources": [{"path": "train.jsonl"}]},
                                    "monitor": {"margin": 0.1}}))
    return path


def traffic(tmp_path, config: Path, planted_drop: bool) -> Path:
    """Labelled traffic whose references are the champion's own answers, or (planted drop) wrong ones."""
    cfg = load_config(config)
    parts = mlflow.transformers.load_model(f"models:/{cfg.name}@champion", return_type="components")
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = generate(parts["model"].eval(), parts["tokenizer"], prompts, cfg.eval.heldout.max_new_tokens, 8)
    path = tmp_path / ("drifted.jsonl" if planted_drop else "steady.jsonl")
    path.write_text("".join(json.dumps({"messages": [*p, {"role": "assistant", "content": "zzz wrong" if planted_drop
                                                          else a}]}) + "\n" for p, a in zip(prompts, answers)))
    return path


def adhoc_runs() -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["adhoc"])))


def test_a_planted_drop_starts_a_retrain_run_with_the_new_data(tmp_path, deployments):
    assert "sftflow-monitor/monitor" in deployments and "sftflow-retrain/adhoc" in deployments
    config = champion_config(tmp_path)
    data = traffic(tmp_path, config, planted_drop=True)
    before = {r.id for r in adhoc_runs()}
    result = monitor(config_file=str(config), data=str(data))
    assert result["dropped"] and result["score"] == 0.0 and result["ci_high"] < 0, result
    started = [r for r in adhoc_runs() if r.id not in before]
    assert [str(r.id) for r in started] == [result["retrain_flow_run_id"]]
    sources = started[0].parameters["sources"]
    # the retrain run reads an admitted copy, which its own fence accepts wherever the traffic came from
    assert Path(sources[-1]["path"]).parent == admitted_traffic() and sources[0]["path"] == "train.jsonl"
    assert Path(sources[-1]["path"]).read_bytes() == data.read_bytes()
    assert started[0].parameters["config_file"] == str(config)
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["monitor/label_acc"] == 0.0 and run.data.tags["sftflow.monitor.verdict"] == "dropped"
    model_id = registry.champion(load_config(config).name).source.removeprefix("models:/")
    history = MlflowClient().get_logged_model(model_id).metrics
    assert any(m.key == "monitor/label_acc" and m.value == 0.0 for m in history)


def test_a_champion_that_holds_up_is_left_alone(tmp_path, deployments):
    config = champion_config(tmp_path)
    data = traffic(tmp_path, config, planted_drop=False)
    before = {r.id for r in adhoc_runs()}
    first = monitor(config_file=str(config), data=str(data))
    second = monitor(config_file=str(config), data=str(data))  # checks accumulate over time
    assert not first["dropped"] and first["score"] == 1.0 and first["retrain_flow_run_id"] is None, first
    assert {r.id for r in adhoc_runs()} == before
    name = load_config(config).name
    assert int(registry.champion(name).version) == 1
    runs = MlflowClient().search_runs([run.info.experiment_id for run in [MlflowClient().get_run(second["mlflow_run_id"])]],
                                      filter_string=f"tags.`sftflow.monitor` = '{name}'")
    assert len(runs) == 2
    steps = [m.step for m in MlflowClient().get_metric_history(second["mlflow_run_id"], "monitor/label_acc")]
    assert steps == [1]


def test_bad_traffic_records_are_rejected_with_file_line_and_reason(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([good] * 20 + ["{not json"]) + "\n")
    records, rejects = read_traffic(path, max_error_share=0.05)
    assert len(records) == 20 and len(rejects) == 1 and rejects[0]["where"] == f"{path}:21"
    path.write_bytes(("\n".join([good] * 20) + "\n").encode() + b'{"messages": "caf\xe9"}\n')  # Latin-1 byte
    records, rejects = read_traffic(path, max_error_share=0.05)
    assert len(records) == 20 and rejects[0]["where"] == f"{path}:21" and "not UTF-8" in rejects[0]["reason"]
    path.write_text("\n".join([good] * 5 + ['{"messages": [{"role": "user", "content": "no answer"}]}', "[1]"]))
    with pytest.raises(MonitorError, match=r"2 of 7 records are unusable(.|\n)*t.jsonl:6: no reference(.|\n)*:7: wrong"):
        read_traffic(path, max_error_share=0.05)


def test_judge_needs_a_drop_beyond_the_margin_and_a_ci_below_zero():
    assert judge(0.0, 1.0, 20, [0.0] * 20, margin=0.1)["dropped"]
    small = judge(0.95, 1.0, 20, [1.0] * 19 + [0.0], margin=0.1)  # within the margin
    assert not small["dropped"] and "within margin" in small["reason"]
    noisy = judge(0.5, 0.8, 5, [1.0, 0.0], margin=0.1)  # beyond the margin, but 2 items: the CI spans zero
    assert noisy["delta"] < -0.1 and noisy["ci_high"] >= 0 and not noisy["dropped"]
