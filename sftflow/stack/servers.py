"""`sftflow up/down/status`: a real Prefect server, a real MLflow tracking server and a Prefect worker
on a process work pool, started as background processes with state and logs under `<state>/servers/`.

`down` stops exactly what `up` started: each process is recorded with its pid *and* start time (so a
recycled pid is never touched), and its whole process tree (the worker's flow-run subprocesses, the
MLflow server's uvicorn workers) is stopped with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from sftflow import env, prefect_db
from sftflow.errors import UserError

HOST = "127.0.0.1"
POOL = "sftflow"
# Order matters: servers first, the worker last (it needs both); `down` stops them in reverse.
SERVICES = ("prefect", "mlflow", "worker")


class ServerError(UserError, RuntimeError):
    """A server that could not be started or reached; the message points at its log."""


def servers_dir() -> Path:
    return env.state_dir() / "servers"


def _state_file() -> Path:
    return servers_dir() / "servers.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServerError(f"`{name}` is not installed in this environment")
    return found


def read_state() -> dict | None:
    path = _state_file()
    return json.loads(path.read_text()) if path.exists() else None


def _proc(entry: dict) -> psutil.Process | None:
    """The recorded process if it still runs (same pid and same start time), else None."""
    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["create_time"]) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _tail(log: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(name: str, cmd: list[str], environ: dict, cwd: Path) -> dict:
    log = servers_dir() / f"{name}.log"
    with log.open("ab") as fh:
        # Own session: a Ctrl-C in the user's terminal does not reach it, and `down` can signal its group.
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environ, cwd=cwd, start_new_session=True)
    return {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "log": str(log),
            "cmd": cmd}


def _wait(name: str, entry: dict, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc(entry) is None:
            raise ServerError(f"{name} exited during start-up; last lines of {entry['log']}:\n{_tail(entry['log'])}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{name} not healthy after {timeout:.0f} s; see {entry['log']}:\n{_tail(entry['log'])}")


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=5).status_code == 200


def worker_online(api_url: str, pool: str) -> bool:
    resp = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    return resp.status_code == 200 and any(w.get("status") == "ONLINE" for w in resp.json())


def base_env(state: Path) -> dict:
    """Environment of every started process: the state dir, Prefect home, offline and no telemetry."""
    environ = {**os.environ, **env.OFFLINE_ENV, "SFTFLOW_HOME": str(state), "PREFECT_HOME": str(state / "prefect")}
    environ.pop("PREFECT_API_URL", None)  # the servers are the API; a user's remote URL must not leak in
    return environ


def up(prefect_port: int = 0, mlflow_port: int = 0, pool: str = POOL, backend_store_uri: str | None = None,
       artifact_root: str | None = None, timeout: float = 180.0) -> dict:
    """Start the Prefect server, the MLflow server and a process-pool worker; wait until each is healthy.

    Ports 0 pick free ones. Without `backend_store_uri`/`artifact_root` MLflow uses the state dir's
    SQLite database and artifact folder (the same ones `sftflow run` writes without servers).
    """
    current = status()
    if current and all(s["running"] for s in current["services"].values()):
        return current
    if current and not any(s["running"] for s in current["services"].values()):
        _state_file().unlink()  # left by a crash or a reboot: nothing of it runs
    elif current:
        raise ServerError("some servers from an earlier `sftflow up` are still running or half-stopped; "
                          "run `sftflow down` first")
    state = env.state_dir()
    servers_dir().mkdir(parents=True, exist_ok=True)
    (state / "prefect").mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        prefect_db.seed(state / "prefect" / "prefect.db")
    prefect_port, mlflow_port = prefect_port or free_port(), mlflow_port or free_port()
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    api_url = f"{prefect_url}/api"
    environ = base_env(state)
    record = {"project_dir": str(Path.cwd()), "pool": pool, "prefect_url": prefect_url, "api_url": api_url,
              "mlflow_url": mlflow_url, "services": {}}

    def save() -> None:
        _state_file().write_text(json.dumps(record, indent=2))

    try:
        record["services"]["prefect"] = _spawn(
            "prefect", [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            # The UI is a browser app: tell it where its API is (it assumes port 4200 otherwise).
            {**environ, "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_UI_API_URL": api_url}, state)
        save()
        record["services"]["mlflow"] = _spawn(
            "mlflow", [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
                       "--backend-store-uri", backend_store_uri or env.default_tracking_uri(state),
                       "--default-artifact-root", artifact_root or (state / "mlartifacts").as_uri()],
            # Without the job runner and with one worker: ~520 MB and ~10 s instead of ~2.3 GB and ~23 s.
            {**environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, state)
        save()
        _wait("prefect server", record["services"]["prefect"], lambda: _http_ok(f"{api_url}/health"), timeout)
        _wait("mlflow server", record["services"]["mlflow"], lambda: _http_ok(f"{mlflow_url}/health"), timeout)

        client_env = {**environ, "PREFECT_API_URL": api_url, "MLFLOW_TRACKING_URI": mlflow_url}
        subprocess.run([_bin("prefect"), "--no-prompt", "work-pool", "create", pool, "--type", "process",
                        "--overwrite"], env=client_env, check=True, capture_output=True, timeout=timeout)
        # The worker runs flows in the project directory, so relative config and data paths resolve.
        record["services"]["worker"] = _spawn("worker", [_bin("prefect"), "worker", "start", "--pool", pool,
                                                         "--type", "process"], client_env, Path.cwd())
        save()
        _wait("prefect worker", record["services"]["worker"], lambda: worker_online(api_url, pool), timeout)
    except (ServerError, subprocess.SubprocessError) as exc:
        down()
        if isinstance(exc, subprocess.CalledProcessError):
            raise ServerError(f"creating work pool {pool!r} failed: {exc.stderr.decode(errors='replace')}") from exc
        raise
    return status()


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _stop(procs: list[psutil.Process], grace: float = 10.0) -> list[psutil.Process]:
    """SIGTERM, then SIGINT (the Prefect worker ignores a first SIGTERM), then SIGKILL; returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace / 2), (signal.SIGINT, grace / 2), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait)
        if not procs:
            break
    return procs


def down(grace: float = 10.0) -> list[int]:
    """Stop every process `up` recorded, with their children. Returns the pids that were stopped.

    Each gets `grace` seconds to exit on SIGTERM/SIGINT before SIGKILL."""
    record = read_state()
    if record is None:
        return []
    stopped: list[int] = []
    for name in reversed(SERVICES):
        entry = record["services"].get(name)
        proc = _proc(entry) if entry else None
        if proc is None:
            continue
        tree = _tree(proc)
        survivors = _stop(tree, grace)
        if survivors:
            raise ServerError(f"{name}: could not stop pids {[p.pid for p in survivors]}")
        stopped += [p.pid for p in tree]
    _state_file().unlink(missing_ok=True)
    return stopped


def status() -> dict | None:
    """What `up` started and whether each part runs and answers; None if nothing was started."""
    record = read_state()
    if record is None:
        return None
    checks = {"prefect": lambda: _http_ok(f"{record['api_url']}/health"),
              "mlflow": lambda: _http_ok(f"{record['mlflow_url']}/health"),
              "worker": lambda: worker_online(record["api_url"], record["pool"])}
    for name, entry in record["services"].items():
        entry["running"] = _proc(entry) is not None
        try:
            entry["healthy"] = entry["running"] and checks[name]()
        except httpx.HTTPError:
            entry["healthy"] = False
    return record


def use() -> dict | None:
    """Point this process's Prefect and MLflow clients at the running servers (explicit env wins)."""
    record = read_state()
    if record is None or not all(_proc(e) for e in record["services"].values()):
        return None
    os.environ.setdefault("PREFECT_API_URL", record["api_url"])
    os.environ.setdefault("MLFLOW_TRACKING_URI", record["mlflow_url"])
    return record
