import pytest
from typer.testing import CliRunner

from sftflow.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["run"], ["curate"], ["config"], ["model"], ["model", "pull"], ["model", "list"]])
def test_every_command_explains_itself(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 5


def test_config_prints_the_resolved_config_and_rejects_bad_fields():
    ok = runner.invoke(app, ["config", "configs/smoke.yaml", "--set", "train.lora.r=12"])
    assert ok.exit_code == 0 and "r: 12" in ok.output and "config hash" in ok.output
    bad = runner.invoke(app, ["config", "configs/smoke.yaml", "--set", "split.seed=abc"])
    assert bad.exit_code == 2 and "split.seed" in bad.output and "'abc'" in bad.output


def test_model_list_names_the_registry():
    result = runner.invoke(app, ["model", "list"])
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output and "tiny-random-llama" in result.output


@pytest.mark.e2e
def test_curate_runs_only_the_data_stage_and_prints_the_report(data_root):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        result = runner.invoke(app, ["curate", "configs/smoke.yaml", "--set", f"data.root={data_root}"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the report is wrapped to the terminal width
    assert "80 records in" in text and "Decontamination" in text and "/split/train.jsonl" in text
