"""`sftflow compare` on runs in the test's MLflow store: differences, deltas, report files."""

import mlflow
import pytest
from test_registry import pipeline_run
from typer.testing import CliRunner

from sftflow.review import compare
from sftflow.cli.app import app

METRICS = {"heldout/delta/label_acc": 0.25, "forgetting/mmlu/delta": -0.05, "forgetting/mmlu/n": 10,
           "train/final_loss": 1.5, "train/trainable_params": 1000}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    a = pipeline_run(tmp, r=4, metrics=METRICS)
    b = pipeline_run(tmp, r=8, metrics={**METRICS, "heldout/delta/label_acc": 0.5, "train/trainable_params": 2000})
    return a, b


def test_table_lists_only_differing_config_and_the_stable_measures(two_runs):
    headers, rows = compare.table(compare.views(list(two_runs)))
    assert headers == ["run-r4", "run-r8"]
    table = dict(rows)
    assert table["config train.lora.r"] == ["4", "8"]
    assert not any(label in ("config train.method", "config model.base") for label in table)  # equal: left out
    assert table["gain label_acc"] == [0.25, 0.5] and table["forgetting mmlu"] == [-0.05, -0.05]
    assert table["train/final_loss"] == [1.5, 1.5] and table["train/trainable_params"] == [1000, 2000]
    assert all(w is not None and w >= 0 for w in table["wall time (s)"])


def test_an_experiment_name_stands_for_its_pipeline_runs(two_runs):
    runs = compare.resolve(["registry-test"], mlflow.MlflowClient())
    ids = {r.info.run_id for r in runs}
    assert set(two_runs) <= ids and all("mlflow.parentRunId" not in r.data.tags for r in runs)


def test_cli_prints_the_differences_and_writes_the_report(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["compare", *two_runs, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "train.lora.r" in result.output and "+0.5000" in result.output
    md = (tmp_path / "report.md").read_text()
    assert "| config train.lora.r | 4 | 8 |" in md and "![deltas](deltas.png)" in md
    assert (tmp_path / "deltas.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_bad_references_are_named():
    result = CliRunner().invoke(app, ["compare", "no-such-run-or-experiment", "x"])
    assert result.exit_code == 2 and "no-such-run-or-experiment" in result.output


@pytest.mark.parametrize("cmd", ["up", "down", "status", "deploy", "promote", "rollback", "compare", "screenshots"])
def test_operations_commands_explain_themselves(cmd):
    result = CliRunner().invoke(app, [cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output, result.output


def test_comparison_charts_draw_missing_values_and_runs_of_the_same_name(tmp_path):
    from sftflow import charts

    deltas = charts.plot_run_deltas(["a", "a"], [("gain label_acc", [0.25, None]), ("forgetting mmlu", [-0.05, -0.1])],
                                    tmp_path / "deltas.png")
    loss = charts.plot_loss_curves([("a", [(1, 2.0), (2, 1.5)]), ("a", [(1, 2.2)])], tmp_path / "train_loss.png")
    for path in (deltas, loss):
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
