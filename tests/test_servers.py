"""`sftflow down` stops exactly what was recorded, process trees included, and nothing else
(real processes; the real servers are exercised in test_servers_e2e.py)."""

import json
import subprocess
import time

import psutil
import pytest

from sftflow.stack import servers


@pytest.fixture
def record(tmp_path):
    servers.servers_dir().mkdir(parents=True, exist_ok=True)
    assert servers.read_state() is None, "a test left servers.json behind"
    procs = {}
    # stubborn, like the worker (ignores SIGTERM), with a child that ignores SIGTERM and SIGINT too
    procs["worker"] = servers._spawn("worker", ["bash", "-c", "trap '' TERM; sleep 300 & wait"], {}, tmp_path)
    procs["mlflow"] = servers._spawn("mlflow", ["sleep", "300"], {}, tmp_path)
    state = {"api_url": "http://127.0.0.1:9/api", "mlflow_url": "http://127.0.0.1:9", "pool": "p",
             "prefect_url": "http://127.0.0.1:9", "services": procs}
    (servers.servers_dir() / "servers.json").write_text(json.dumps(state))
    yield state
    servers.down(grace=1)


def tree(entry) -> list[psutil.Process]:
    proc = psutil.Process(entry["pid"])
    return [proc, *proc.children(recursive=True)]


def test_down_stops_each_recorded_process_and_its_children(record):
    time.sleep(0.5)  # let bash start its child
    procs = tree(record["services"]["worker"]) + tree(record["services"]["mlflow"])
    assert len(procs) == 3
    stopped = servers.down(grace=1)
    assert sorted(stopped) == sorted(p.pid for p in procs)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert servers.read_state() is None and servers.down(grace=1) == []


def test_status_reports_dead_and_unhealthy_parts(record):
    psutil.Process(record["services"]["mlflow"]["pid"]).kill()
    time.sleep(0.3)
    state = servers.status()
    assert state["services"]["worker"]["running"] and not state["services"]["worker"]["healthy"]
    assert not state["services"]["mlflow"]["running"]
    with pytest.raises(servers.ServerError, match="sftflow down"):
        servers.up()  # half-running: refuses to start a second set


def test_a_recycled_pid_is_never_touched(record):
    time.sleep(0.1)  # start times have 10 ms resolution: the bystander must not share the recorded one
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        state = servers.read_state()
        state["services"]["mlflow"] = {**state["services"]["mlflow"], "pid": bystander.pid}  # other start time
        (servers.servers_dir() / "servers.json").write_text(json.dumps(state))
        servers.down(grace=1)
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        psutil.Process(record["services"]["mlflow"]["pid"]).kill()
