"""User errors end in one readable message and exit 2; the traceback goes to a log file, and `--debug` shows it.

The CLI runs as a subprocess (its own state dir, a real Prefect ephemeral server, MLflow on SQLite), as a
user runs it; Prefect's own failure logs must not flood the terminal either.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow.configs.loader import ConfigError
from sftflow.errors import UserError
from sftflow.models import ModelError
from sftflow.review.compare import CompareError
from sftflow.stack.fence import FenceError
from sftflow.release.registry import RegistryError
from sftflow.stack.servers import ServerError
from sftflow.review.screenshots import ShotError
from sftflow.tasks.data.decontam import DecontamError
from sftflow.tasks.data.load import DataError
from sftflow.tasks.data.preflight import PreflightError
from sftflow.tasks.evaluation.catalog import MissingBenchmarkError
from sftflow.tasks.training.setup import TrainSetupError
from sftflow.tasks.training.template import TemplateError

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_errorsTestSecret0123456789"


def sftflow(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "MLFLOW_TRACKING_URI",
                                                                   "PREFECT_API_URL", "SFTFLOW_DEBUG")}
    environ.update(SFTFLOW_HOME=str(home), HF_TOKEN=SECRET, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "sftflow.cli", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def assert_clean(proc, message: str, max_lines: int | None = None) -> None:
    """Exit 2; the message once, in the last lines; no traceback, no Prefect error log. Errors raised before a
    flow starts print at most `max_lines` in all; inside a flow, what came before the error is the run's progress."""
    out = "\n".join(lines(proc))
    assert proc.returncode == 2, out
    assert " ".join(out.split()).count(message) == 1, out  # said once: not echoed by Prefect's failure logs
    assert "Traceback" not in out and "| ERROR" not in out, out  # neither ours nor Prefect's
    shown = [line for line in lines(proc) if "Stopping temporary server" not in line]
    start = next(i for i, line in enumerate(shown) if line.startswith("error: "))
    # the message (at most a few lines), then where its traceback is, and nothing after
    assert shown[-1].startswith("traceback: ") and len(shown) - start <= 5, out
    assert max_lines is None or len(lines(proc)) <= max_lines, out
    assert SECRET not in out


def log_file(proc) -> Path:
    line = next(line for line in lines(proc) if line.startswith("traceback: "))
    path = Path(line.removeprefix("traceback: ").split(" (")[0])
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and SECRET not in text
    return path


@pytest.mark.parametrize("cls", [ConfigError, DataError, PreflightError, ModelError, TemplateError, TrainSetupError,
                                 MissingBenchmarkError, DecontamError, FenceError, CompareError, RegistryError,
                                 ServerError, ShotError])
def test_every_user_error_shares_one_base(cls):
    assert issubclass(cls, UserError)


def test_a_bad_config_field_is_one_message_and_its_traceback_is_logged(tmp_path):
    proc = sftflow(tmp_path, "config", "configs/smoke.yaml", "--set", "split.seed=abc")
    assert_clean(proc, "split.seed", max_lines=3)
    assert log_file(proc).parent == tmp_path / "logs"  # no run folder exists yet


def test_missing_benchmark_files_stop_the_run_before_any_work(tmp_path):
    (tmp_path / "bench" / "bbh").mkdir(parents=True)
    proc = sftflow(tmp_path, "run", "configs/smoke.yaml", "--set", f"eval.benchmark_root={tmp_path / 'bench'}")
    assert_clean(proc, "mmlu/test/anatomy_test.csv", max_lines=6)
    assert "--set eval.benchmark_root=PATH" in proc.stderr and "bbh/navigate.json" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prefect").exists()  # nothing started


def test_compare_with_one_run_is_cli_misuse(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("one-run", artifact_location=str(tmp_path / "art")))
    client.set_terminated(run.info.run_id)
    proc = sftflow(tmp_path, "compare", run.info.run_id)
    assert_clean(proc, "compare needs at least two runs", max_lines=4)
    log_file(proc)


@pytest.mark.e2e
def test_a_data_error_inside_the_flow_is_one_message_and_lands_in_the_runs_log(tmp_path):
    """A stage (Prefect task) fails with a user error: Prefect's task and flow failure logs stay off the terminal."""
    proc = sftflow(tmp_path, "run", "configs/smoke.yaml", "--set", "data.sources=[{path: no-such-file.jsonl}]")
    assert_clean(proc, "source 'no-such-file.jsonl': no file matches")
    log = log_file(proc)
    assert log.name == "error.log" and log.parent.parent == tmp_path / "runs"  # the run's own folder
    assert "DataError" in log.read_text()


@pytest.mark.e2e
def test_a_model_error_masks_a_pasted_token_and_debug_shows_the_traceback(tmp_path):
    quiet = sftflow(tmp_path, "run", "configs/smoke.yaml", "--set", f"model.base={SECRET}")
    assert_clean(quiet, "is neither a registry alias")
    assert "model.base '***'" in quiet.stderr  # the token the user pasted is masked, in the log file too
    log_file(quiet)
    loud = sftflow(tmp_path, "--debug", "run", "configs/smoke.yaml", "--set", f"model.base={SECRET}")
    out = loud.stdout + loud.stderr
    assert loud.returncode == 2 and "Traceback" in out and "ModelError" in out


def test_debug_shows_the_traceback_of_a_config_error(tmp_path):
    proc = sftflow(tmp_path, "--debug", "config", "configs/smoke.yaml", "--set", "split.seed=abc")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" in out and "ConfigError" in out and "split.seed" in out
