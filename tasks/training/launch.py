"""Where a training runs: in this process (default), or as `accelerate launch` worker processes.

Both call `train.train(**job)`. A worker reads the job from a JSON spec (`python -m
sftflow.tasks.training.launch SPEC`, run by `accelerate launch ... -m sftflow.tasks.training.launch SPEC`); only rank 0
writes outputs and the result JSON, so nothing but files crosses the process boundary. Step metrics
reach the stage's MLflow run through MLFLOW_RUN_ID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sftflow.configs.training import TrainConfig

SPEC, RESULT = "launch_spec.json", "result.json"


class WorkerDied(RuntimeError):
    """A launched training exited without a result (killed, crashed); running it again resumes it."""


def run_inprocess(job: dict, cfg: TrainConfig) -> dict:
    from sftflow.tasks.training.train import train

    return train(**{**job, "out_dir": Path(job["out_dir"])})


def _free_port() -> int:
    # Several trainings (other flows, other users) can share a host: never assume 29500 is free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(spec: Path, cfg: TrainConfig) -> list[str]:
    """`accelerate launch` for the worker. Without a config file: one machine, N local processes
    (torchrun); on a CPU-only host each worker sets use_cpu, so accelerate picks gloo (DDP on CPU)."""
    launcher = cfg.launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launcher.num_processes),
           "--main_process_port", str(_free_port())]
    if launcher.config_file:
        config = Path(launcher.config_file).expanduser()
        if not config.is_file():
            raise FileNotFoundError(f"train.launcher.config_file not found: {config.resolve()}")
        cmd += ["--config_file", str(config.resolve())]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if launcher.num_processes > 1:
            cmd += ["--multi_gpu"]  # accelerate's name for "torchrun, N local processes", also on CPU
    return [*cmd, "-m", "sftflow.tasks.training.launch", str(spec)]


def write_spec(job: dict, cfg: TrainConfig) -> Path:
    """The worker's job as JSON in its out_dir: `python -m sftflow.tasks.training.launch <that file>` runs it."""
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT).unlink(missing_ok=True)
    spec = out_dir / SPEC
    spec.write_text(json.dumps({**job, "out_dir": str(out_dir), "cfg": cfg.model_dump(mode="json")}, indent=2))
    return spec


def run_accelerate(job: dict, cfg: TrainConfig) -> dict:
    import mlflow

    out_dir = Path(job["out_dir"])
    spec = write_spec(job, cfg)
    env = dict(os.environ)
    if mlflow.active_run():
        env["MLFLOW_RUN_ID"] = mlflow.active_run().info.run_id
    # Own process group: if this process is interrupted, no worker is left training on its own.
    # close_fds=False: the launcher inherits the training's lock (tasks/training/run.py), so even if this
    # process is SIGKILLed, no rerun trains into the same folder while the orphaned workers still run.
    proc = subprocess.Popen(accelerate_command(spec, cfg), env=env, start_new_session=True, close_fds=False)
    try:
        code = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if code != 0 or not (out_dir / RESULT).exists():
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise WorkerDied(f"training workers (accelerate launch, {cfg.launcher.num_processes} processes) "
                         f"ended without a result: {how}; "
                         f"a rerun resumes from the last checkpoint in {out_dir / 'checkpoints'}")
    return json.loads((out_dir / RESULT).read_text())


LAUNCHERS = {"inprocess": run_inprocess, "accelerate": run_accelerate}


def launch(job: dict, cfg: TrainConfig) -> dict:
    """Run train(**job) with cfg.launcher; job = token_paths, model_path, cfg, out_dir, trust_remote_code."""
    return LAUNCHERS[cfg.launcher.kind]({**job, "cfg": cfg}, cfg)


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from sftflow import env

    env.configure(offline=False)  # the launching process's environment (offline mode included) is inherited
    from sftflow.tasks.training.train import train

    cfg = TrainConfig.model_validate(spec.pop("cfg"))
    out_dir = Path(spec.pop("out_dir"))
    result = train(cfg=cfg, out_dir=out_dir, **spec)
    if result:  # rank 0 only: the other ranks return nothing
        tmp = out_dir / f".{RESULT}.tmp"
        tmp.write_text(json.dumps(result, default=str, indent=2))
        os.replace(tmp, out_dir / RESULT)


if __name__ == "__main__":
    worker_main(sys.argv[1])
