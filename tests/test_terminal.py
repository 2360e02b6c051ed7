"""What a run shows on the terminal: one line per finished stage, warnings and errors; the libraries' progress bars,
prints and Prefect's INFO lines go to the run's run.log."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow import tracking
from sftflow.cli.terminal import RunOutput

REPO = Path(__file__).resolve().parents[1]


def test_chatter_goes_to_the_log_and_stage_summaries_to_the_terminal(tmp_path, capsys, monkeypatch):
    from tqdm import tqdm

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "state"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunOutput("test") as out:
        print({"loss": "6.267", "grad_norm": "0.328"})  # as the Trainer's PrinterCallback does
        for _ in tqdm(range(3), desc="Generating test split"):
            pass
        tracking.log_summary("load", {"load/records": 80, "load/rejected": 2, "load/cache_hit": 0}, 0.25)
        tracking.log_summary("split", {"split/train": 60, "split/val": 8, "split/test": 12, "split/cache_hit": 1}, 0.1)
        out.run_dir = str(run_dir)
    captured = capsys.readouterr()
    assert [line.rstrip() for line in captured.out.splitlines()] == [
        "✓ load          0.2 s  80 records, 2 rejected",
        "✓ split         0.1 s  cached  train 60 / val 8 / test 12"]
    assert captured.err == ""
    assert out.log_path == run_dir / "run.log" and not list((tmp_path / "state" / "logs").iterdir())
    log = out.log_path.read_text()
    assert "'grad_norm': '0.328'" in log
    # the bar as it ended, once: not every frame tqdm drew
    [bar] = [line for line in log.splitlines() if "Generating test split" in line]
    assert "3/3" in bar and "\r" not in log
    assert "sftflow.stages: load: 0.2 s; 80 records, 2 rejected" in log and "split: cache hit, 0.1 s" in log


def test_a_bar_still_running_is_written_as_it_stands_once_a_minute(tmp_path):
    from sftflow.cli.terminal import LastFrameWriter

    clock = iter([0.0, 10.0, 30.0, 61.0, 70.0, 75.0, 80.0]).__next__  # seconds at creation and at each write
    path = tmp_path / "log"
    with path.open("w") as log, LastFrameWriter(log, clock) as out:
        for text in ("\rtrain 1/9", "\rtrain 2/9", "\rtrain 5/9", "\rtrain 9/9", "\n", "done"):
            out.write(text)
    assert path.read_text().splitlines() == ["train 5/9", "train 9/9", "done"]


def test_verbose_changes_nothing(tmp_path, capsys, monkeypatch):
    from sftflow.cli import terminal

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(terminal, "VERBOSE", True)
    with RunOutput("test") as out:
        print("trainer dict")
    assert capsys.readouterr().out == "trainer dict\n" and not out.log_path.exists()


@pytest.mark.e2e
def test_a_cli_run_prints_a_line_per_stage_and_keeps_the_rest_in_run_log(tmp_path, data_root):
    environ = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "MLFLOW_TRACKING_URI",
                                                                   "PREFECT_API_URL", "SFTFLOW_DEBUG")}
    environ.update(SFTFLOW_HOME=str(tmp_path), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "sftflow.cli", "curate", "configs/smoke.yaml", "--set",
                           f"data.root={data_root}"], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("model", "load", "curate", "split"):
        assert re.search(rf"^✓ {stage}\s+[\d.]+ s", proc.stdout, re.M), proc.stdout
    assert "80 records, 0 rejected" in proc.stdout
    terminal = proc.stdout + proc.stderr
    for chatter in ("Task run", "Finished in state", "Starting temporary server", "Stopping temporary server",
                    "Writing model shards", "Creating initial MLflow database"):
        assert chatter not in terminal, terminal
    [log] = (tmp_path / "runs").glob("*/run.log")
    text = log.read_text()
    for chatter in ("Finished in state Completed()", "Starting temporary server", "Writing model shards",
                    "prefect.task_runs: load: ", "Creating initial MLflow database"):
        assert chatter in text, text
