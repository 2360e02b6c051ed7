"""Operations end to end with the real servers: `sftflow up` (Prefect server, MLflow server, process
worker), `sftflow deploy`, an ad-hoc run triggered through the Prefect API exactly as the UI does,
the MLflow run and registry aliases, both UIs rendered in headless Chromium, `compare`, `screenshots`,
the cron scheduler (train once, then "up to date"), and `sftflow down` leaving no process behind.

One `up` for the whole module (the servers cost ~30 s and ~1 GB); torn down even when a test fails.
Tests run in file order and build on each other's runs.
"""

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sftflow import env
from sftflow.stack import servers
from sftflow.review.screenshots import prefect_run_page, shows

pytestmark = [pytest.mark.e2e, pytest.mark.servers]

REPO = Path(__file__).resolve().parents[1]
SFTFLOW = str(Path(sys.executable).with_name("sftflow"))
CLIENT_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME")  # the CLI must find the servers itself
STATE: dict = {}  # what earlier tests produced, for the later ones


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    proc = subprocess.run([SFTFLOW, *args], cwd=REPO, env={**environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"sftflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def stack():
    try:
        cli("up", timeout=300)
        record = servers.read_state()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: record["api_url"]}):
            yield record
    finally:
        servers.down()  # also when a test failed; a no-op after test_down


@pytest.fixture(scope="module")
def mlflow_client(stack):
    return MlflowClient(tracking_uri=stack["mlflow_url"])


def prefect():
    from prefect import get_client

    return get_client(sync_client=True)


def wait_final(flow_run_id, timeout: float = 600):
    deadline = time.monotonic() + timeout
    with prefect() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s: {run.state}")


def run_adhoc(parameters: dict):
    """What the Prefect UI does on "Run": a parameters dict valid for the deployment's schema, posted to
    create_flow_run_from_deployment."""
    with prefect() as client:
        deployment = client.read_deployment_by_name("sftflow-retrain/adhoc")
        jsonschema.validate(parameters, deployment.parameter_openapi_schema)
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return wait_final(flow_run.id)


def artifacts_of(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def test_up_starts_healthy_servers_on_free_local_ports(stack):
    out = cli("status").stdout
    assert out.count("yes") == 6 and stack["prefect_url"] in out and stack["mlflow_url"] in out
    for url in (stack["prefect_url"], stack["mlflow_url"]):
        assert url.startswith("http://127.0.0.1:") and not url.endswith((":4200", ":5000"))
    assert Path(env.state_dir(), "servers", "prefect.log").exists()
    # `up` again is a no-op while everything runs
    assert cli("up").stdout.count("yes") == 6 and servers.read_state()["services"] == stack["services"]


def test_adhoc_deployment_runs_on_the_worker_and_registers_a_candidate(stack, mlflow_client, data_root):
    out = cli("deploy", "--config", "configs/smoke.yaml").stdout
    assert "sftflow-retrain/adhoc" in out and "sftflow-retrain/nightly" in out
    with prefect() as client:
        nightly = client.read_deployment_by_name("sftflow-retrain/nightly")
        adhoc = client.read_deployment_by_name("sftflow-retrain/adhoc")
    assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *" and not adhoc.schedules
    assert adhoc.entrypoint == "sftflow.flows.retrain.retrain"  # a module path: imported from the package and adhoc.work_pool_name == stack["pool"]
    form = adhoc.parameter_openapi_schema["properties"]
    assert {"config_file", "overrides", "model", "method", "sources", "force"} <= set(form)
    assert form["method"]["anyOf"][0]["enum"] == ["lora", "full"]

    run = run_adhoc({"config_file": "configs/smoke.yaml", "overrides": [f"data.root={data_root}", "name=adhoc-e2e"]})
    assert run.state.is_completed() and run.state.name == "Completed", run.state

    # Prefect -> MLflow: the flow run's artifacts link its MLflow run and carry the summary
    arts = artifacts_of(run.id)
    run_id = re.search(r"/runs/([0-9a-f]{32})", arts["mlflow-run"].data).group(1)
    assert "held-out label_acc" in arts["sftflow-retrain"].data
    # MLflow -> Prefect: the run carries the flow-run ids and URLs
    mlrun = mlflow_client.get_run(run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["train.lora.r"] == "4"
    assert mlrun.data.tags["prefect.root_flow_run_url"] == prefect_run_page(stack["prefect_url"], str(run.id))
    assert mlrun.data.tags["prefect.flow_run_url"].endswith(mlrun.data.tags["prefect.flow_run_id"])

    # the registry: version 1 of `adhoc-e2e`, challenger; champion only if the gate passed
    version = mlflow_client.get_model_version_by_alias("adhoc-e2e", "challenger")
    assert int(version.version) == 1 and version.tags["mlflow.parent_run_id"] == run_id
    assert version.tags["sftflow.config_hash"] == mlrun.data.tags["sftflow.config_hash"]
    if version.tags["gate.passed"] == "true":
        assert int(mlflow_client.get_model_version_by_alias("adhoc-e2e", "champion").version) == 1
    else:
        assert "champion" not in version.aliases
    STATE.update(first_flow_run=run, first_run=mlrun)


def test_both_uis_render_the_run_and_the_run_form_in_headless_chromium(stack):
    run, mlrun = STATE["first_flow_run"], STATE["first_run"]
    # the ad-hoc deployment's "Custom run" page: a form generated from the flow's typed parameters
    shows(f"{stack['prefect_url']}/deployments/deployment/{run.deployment_id}/run",
          ["config_file", "overrides", "model", "method", "sources", "force", "Submit"])
    shows(prefect_run_page(stack["prefect_url"], str(run.id)), [run.name, "Completed", "sftflow-retrain"])
    shows(f"{stack['mlflow_url']}/#/experiments/{mlrun.info.experiment_id}/runs/{mlrun.info.run_id}",
          [mlrun.info.run_name, "train.lora.r", "heldout/delta/label_acc"])


def test_compare_two_runs_with_different_lora_ranks(stack, data_root, tmp_path):
    run = run_adhoc({"config_file": "configs/smoke.yaml",
                     "overrides": [f"data.root={data_root}", "name=adhoc-e2e", "train.lora.r=8"]})
    assert run.state.is_completed(), run.state
    second = re.search(r"/runs/([0-9a-f]{32})", artifacts_of(run.id)["mlflow-run"].data).group(1)
    first = STATE["first_run"].info.run_id
    out = cli("compare", first, second, "--out", str(tmp_path)).stdout
    row = next(line for line in out.splitlines() if "train.lora.r" in line)
    assert re.search(r"\b4\b.*\b8\b", row), row
    assert "forgetting mmlu" in out and "train/final_loss" in out and "wall time" in out
    params = [line for line in out.splitlines() if "config " in line]
    assert len(params) == 1, params  # nothing but the rank differs
    assert (tmp_path / "report.md").exists() and (tmp_path / "train_loss.png").exists()
    STATE.update(second_run=second)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_screenshots_command_shows_the_flow_run_and_the_comparison(stack, tmp_path):
    out = cli("screenshots", STATE["first_run"].info.run_id, STATE["second_run"],
              "--flow-run", str(STATE["first_flow_run"].id), "--out", str(tmp_path)).stdout
    assert "prefect-flow-run.png" in out and "mlflow-compare.png" in out
    assert png_size(tmp_path / "prefect-flow-run.png") == (1600, 1000)
    assert png_size(tmp_path / "mlflow-compare.png") == (1600, 2400)
    assert min((tmp_path / p).stat().st_size for p in ("prefect-flow-run.png", "mlflow-compare.png")) > 30_000


def test_promote_and_rollback_move_the_champion(mlflow_client):
    assert "champion is now v1" in cli("promote", "adhoc-e2e", "1").stdout
    assert "champion is now v2" in cli("promote", "adhoc-e2e", "2").stdout
    assert "champion is now v1" in cli("rollback", "adhoc-e2e").stdout
    assert int(mlflow_client.get_model_version_by_alias("adhoc-e2e", "champion").version) == 1


def test_cron_schedule_trains_once_then_finishes_up_to_date(stack, mlflow_client, data_root, tmp_path):
    cfg = yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    cfg.update(name="nightly-e2e")
    cfg["data"]["root"] = str(data_root)
    cfg["eval"]["mmlu"]["enabled"] = cfg["eval"]["bbh"]["enabled"] = False  # the schedule is under test here
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli("deploy", "--config", str(config), "--cron", "* * * * *")
    with prefect() as client:
        deployment = client.read_deployment_by_name("sftflow-retrain/nightly")
    assert deployment.schedules[0].schedule.cron == "* * * * *"

    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    finished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED])))
    deadline, runs = time.monotonic() + 420, []
    with prefect() as client:
        while time.monotonic() < deadline and len(runs) < 2:
            time.sleep(5)
            runs = client.read_flow_runs(flow_run_filter=finished, sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                                         deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        client.pause_deployment(deployment.id)  # no more fires
    assert len(runs) >= 2, f"the scheduler fired {len(runs)} finished runs in 7 minutes"
    first, second = runs[:2]
    assert all(r.auto_scheduled for r in (first, second)) and second.expected_start_time > first.expected_start_time
    assert first.state.name == "Completed", first.state
    assert second.state.name == "UpToDate" and "nothing trained" in second.state.message, second.state
    assert second.total_run_time.total_seconds() < first.total_run_time.total_seconds() / 2
    # trained exactly once: one pipeline run in MLflow, one registered version
    exp = mlflow_client.get_experiment_by_name(cfg["tracking"]["experiment"])
    pipeline_runs = [r for r in mlflow_client.search_runs([exp.experiment_id])
                     if r.info.run_name.startswith("nightly-e2e-") and "mlflow.parentRunId" not in r.data.tags]
    assert len(pipeline_runs) == 1
    assert len(mlflow_client.search_model_versions("name = 'nightly-e2e'")) == 1


def test_the_monitor_loop_retrains_on_traffic_kept_outside_the_retrain_fence(stack, mlflow_client, data_root,
                                                                            tmp_path):
    """The monitor deployment admits traffic from a folder only its own fence allows; the retrain run it starts
    on the worker reads the admitted copy and completes, fenced as before."""
    import json

    import mlflow
    from test_registry import PASS, fp, pipeline_run

    from sftflow.release import registry

    conf, traffic_dir = tmp_path / "conf", tmp_path / "where-users-keep-traffic"
    conf.mkdir(), traffic_dir.mkdir()
    cfg = yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    cfg.update(name="loop-e2e", monitor={"margin": 0.1})
    cfg["data"]["root"] = cfg["eval"]["benchmark_root"] = str(data_root)
    cfg["eval"]["mmlu"]["enabled"] = cfg["eval"]["bbh"]["enabled"] = False  # the loop is under test here
    config = conf / "loop.yaml"
    config.write_text(yaml.safe_dump(cfg))
    specs = yaml.safe_load((REPO / "deployments/deployments.yaml").read_text())
    specs["monitor"]["allow"]["roots"] = [*specs["monitor"]["allow"]["roots"], str(traffic_dir)]
    (conf / "deployments.yaml").write_text(yaml.safe_dump({k: specs[k] for k in ("adhoc", "monitor")}))
    cli("deploy", "--file", str(conf / "deployments.yaml"), "--config", str(config))
    # a champion whose held-out score was 1.0, and traffic it gets all wrong
    previous = mlflow.get_tracking_uri()  # the session's store: the tests after this one register there
    mlflow.set_tracking_uri(stack["mlflow_url"])
    try:
        registry.register_candidate("loop-e2e", pipeline_run(tmp_path, metrics={"heldout/ft/label_acc": 1.0,
                                                                                  "heldout/records": 20}),
                                    PASS, fp("loop"), {})
    finally:
        mlflow.set_tracking_uri(previous)
    traffic = traffic_dir / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Is {i} even? Say yes or no."},
                                                        {"role": "assistant", "content": "zzz wrong"}]}) + "\n"
                               for i in range(20)))
    with prefect() as client:
        monitor = client.read_deployment_by_name("sftflow-monitor/monitor")
        run = client.create_flow_run_from_deployment(monitor.id, parameters={
            "config_file": str(config), "data": str(traffic), "overrides": ["gate.vs_champion.enabled=false"]})
    finished = wait_final(run.id)
    assert finished.state.is_completed(), finished.state
    with prefect() as client:
        adhoc = client.read_deployment_by_name("sftflow-retrain/adhoc")
        started = [r for r in client.read_flow_runs() if r.deployment_id == adhoc.id
                   and r.parameters.get("config_file") == str(config)]
    assert len(started) == 1
    source = started[0].parameters["sources"][-1]["path"]
    assert Path(source).parent == env.state_dir() / "traffic" and Path(source).read_bytes() == traffic.read_bytes()
    retrained = wait_final(started[0].id)
    assert retrained.state.is_completed() and retrained.state.name == "Completed", retrained.state
    assert len(mlflow_client.search_model_versions("name = 'loop-e2e'")) == 2


def test_down_leaves_no_process_behind(stack):
    home = str(env.state_dir())
    started = []
    for entry in stack["services"].values():
        proc = psutil.Process(entry["pid"])
        started += [proc, *proc.children(recursive=True)]
    assert len(started) >= 3
    assert "stopped" in cli("down").stdout
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    # nothing else runs with this state dir, apart from this test process and its own children
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    strays = []
    for p in psutil.process_iter():
        try:
            if p.pid not in mine and p.environ().get("SFTFLOW_HOME") == home:
                strays.append((p.pid, p.cmdline()))
        except psutil.Error:
            pass
    assert not strays, strays
    assert servers.read_state() is None and "no servers" in cli("status").stdout
