"""Whole `sftflow run` processes (smoke config) under faults: two runs at once, SIGKILL at several stages,
the MLflow tracking server unreachable or stopped mid-run. Each ends with a rerun that completes and no
MLflow run left RUNNING. All tests share one state dir, so later ones reuse the model and cached stages."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from sftflow import cache
from sftflow.stack.servers import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-home")


def start_run(home: Path, log: Path, *overrides: str, tracking_uri: str | None = None,
              threads: int | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    environ["SFTFLOW_HOME"] = str(home)
    if threads:  # runs side by side: torch's spinning OpenMP threads would fight over the cores
        environ["OMP_NUM_THREADS"] = str(threads)
    if tracking_uri:
        environ["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [sys.executable, "-m", "sftflow.cli", "run", str(REPO / "configs/smoke.yaml"), "--set",
           f"data.root={SHARED_DATA}", *(a for o in overrides for a in ("--set", o))]
    with log.open("w") as fh:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    proc.wait(timeout)
    return log.read_text(errors="replace")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started (its ephemeral Prefect server), as the OOM killer might."""
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(60)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def run_dirs(home: Path) -> set[Path]:
    return set((home / "runs").glob("*")) if (home / "runs").exists() else set()


def stage_started(home: Path, before: set[Path], stage: str):
    return lambda: any((d / stage).is_dir() for d in run_dirs(home) - before)


def running_runs(tracking_uri: str) -> int:
    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(exps, filter_string="attributes.status = 'RUNNING'"))


def assert_cache_intact(home: Path) -> int:
    """Every published entry verifies, and no temp or trash folder is left to be mistaken for one."""
    entries = [p.parent for p in (home / "cache").glob("*/*/" + cache.MANIFEST)]
    assert entries and all(cache.problem(e) is None for e in entries)
    assert not [p for p in (home / "cache").glob("*/.*") if p.name.startswith((".tmp-", ".trash-"))]
    return len(entries)


def test_two_runs_of_one_config_at_once_both_complete(home, tmp_path):
    procs = [(start_run(home, tmp_path / f"{i}.log", threads=1), tmp_path / f"{i}.log") for i in range(2)]
    outs = [finish(p, log) for p, log in procs]
    for (p, _), out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert "database is locked" not in out and "promotion gate" in out
    assert len(run_dirs(home)) == 2  # separate run folders
    assert assert_cache_intact(home) >= 5  # load, curate, split, train, benchmarks: one entry each
    assert running_runs(f"sqlite:///{home}/mlflow.db") == 0


@pytest.mark.parametrize("stages", [("split", "train", "benchmarks")])
def test_a_run_killed_at_any_stage_completes_when_rerun(home, tmp_path, stages):
    uri = f"sqlite:///{home}/mlflow.db"
    seed = "data.seed=1"  # new data: every stage computes again instead of coming from the first test's cache
    for stage in stages:
        before, log = run_dirs(home), tmp_path / f"killed-{stage}.log"
        proc = start_run(home, log, seed)
        wait_for(stage_started(home, before, stage), proc, log)
        kill_tree(proc)
        assert proc.returncode == -signal.SIGKILL
        assert running_runs(uri) >= 1  # what a SIGKILL leaves; the next run closes them
    proc = start_run(home, tmp_path / "rerun.log", seed)
    out = finish(proc, tmp_path / "rerun.log")
    assert proc.returncode == 0, out[-4000:]
    logged = out + "".join(p.read_text() for p in (home / "runs").glob("*/run.log"))  # prints go to run.log
    assert "marked" in logged and "KILLED" in logged  # the killed runs' MLflow runs, closed by this one
    assert running_runs(uri) == 0
    assert_cache_intact(home)


def start_mlflow(home: Path, port: int) -> subprocess.Popen:
    environ = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (home / "mlflow-server.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/server.db",
                             "--default-artifact-root", (home / "server-artifacts").as_uri()],
                            env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (home / "mlflow-server.log").read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def test_mlflow_server_stopped_mid_run_fails_fast_and_a_rerun_completes(home, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    server = start_mlflow(home, port)
    try:
        before, log = run_dirs(home), tmp_path / "mid.log"
        proc = start_run(home, log, tracking_uri=uri)
        wait_for(stage_started(home, before, "template"), proc, log)
        stop(server)
        stopped = time.monotonic()
        out = finish(proc, log)
        mid_run_s = time.monotonic() - stopped
        assert proc.returncode != 0 and f"MLflow tracking server {uri} stopped answering" in out, out[-4000:]
        assert mid_run_s < 60
        message = next(line for line in out.splitlines() if "stopped answering" in line)
        failed_lines = len(out.splitlines())

        server = start_mlflow(home, port)
        left_running = running_runs(uri)  # the failed run could not close its runs while the server was down
        proc = start_run(home, tmp_path / "back.log", tracking_uri=uri)
        out = finish(proc, tmp_path / "back.log")
        assert proc.returncode == 0, out[-4000:]
        assert running_runs(uri) == 0
    finally:
        if server.poll() is None:
            stop(server)
    print(f"\nMLflow stopped mid-run: failed {mid_run_s:.1f} s after the stop ({failed_lines} lines of "
          f"output: {message.strip()[:300]}); {left_running} run(s) RUNNING until the rerun closed them")
