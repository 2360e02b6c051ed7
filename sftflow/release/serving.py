"""Serving a registered version (`sftflow serve`): `mlflow models serve` on 127.0.0.1, and a chat client for it.

The server is MLflow's own scoring server (`/ping`, `/invocations`); a model logged with the `llm/v1/chat`
task takes OpenAI-style `{"messages": [...], "max_tokens": N}` and answers with `choices[0].message`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from sftflow.errors import UserError
from sftflow.stack.servers import HOST, free_port


class ServeError(UserError, RuntimeError):
    pass


def model_uri(name: str, alias: str = "champion") -> str:
    return f"models:/{name}@{alias}"


def serve_command(model_uri: str, port: int) -> list[str]:
    """`--env-manager local`: serve with this environment's packages (no virtualenv built at start)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", HOST, "--port", str(port), "--workers", "1"]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"`mlflow models serve` exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ServeError(f"`mlflow models serve` did not answer {url}/ping within {timeout:.0f} s; log: {log}")


def serving_env() -> dict[str, str]:
    """MLflow starts the scoring server as `uvicorn` through a shell: find this environment's first."""
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def served(model_uri: str, log: Path, port: int | None = None) -> Iterator[str]:
    """Run `mlflow models serve` for model_uri until the block ends -> its base URL."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(serve_command(model_uri, port), stdout=out, stderr=subprocess.STDOUT,
                                env=serving_env(), start_new_session=True)
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        # its own session: the scoring server's worker processes go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat(url: str, messages: list[dict], max_tokens: int = 64, timeout: float = 120.0) -> str:
    """One chat request to a served model -> the assistant's answer."""
    response = httpx.post(f"{url}/invocations", json={"messages": messages, "max_tokens": max_tokens},
                          timeout=timeout)
    response.raise_for_status()
    body = response.json()
    answer = body[0] if isinstance(body, list) else body.get("predictions", body)
    if isinstance(answer, list):
        answer = answer[0]
    return answer["choices"][0]["message"]["content"]
