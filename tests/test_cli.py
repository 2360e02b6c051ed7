import pytest
from typer.testing import CliRunner

from sftflow.cli.app import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["run"], ["curate"], ["eval"], ["config"], ["model"], ["model", "pull"], ["model", "list"]])
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
def test_curate_runs_only_the_data_stage_and_prints_the_report(data_root, prefect_server):
    result = runner.invoke(app, ["curate", "configs/smoke.yaml", "--set", f"data.root={data_root}"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the report is wrapped to the terminal width
    assert "80 records in" in text and "Decontamination" in text and "/split/train.jsonl" in text


def test_eval_runs_only_the_sweep_for_a_model_and_tracks_it(tiny_model):
    from mlflow.tracking import MlflowClient

    args = ["eval", "configs/smoke.yaml", "--model", tiny_model, "--baseline",
            "--set", "eval.mmlu.subtasks=[anatomy]", "--set", "eval.bbh.subtasks=[navigate]",
            "--set", "tracking.experiment=cli-eval"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mmlu/acc" in result.output and "mmlu_stem/acc" in result.output and "bbh/exact_match" in result.output
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("cli-eval").experiment_id],
                                  filter_string="tags.mlflow.runName LIKE 'smoke-eval-%'")
    metrics = parent.data.metrics
    assert metrics["forgetting/model/mmlu/delta"] == 0.0  # the same weights on both sides
    assert {"eval/base/mmlu/acc", "eval/model/bbh/exact_match", "eval/model/mmlu_stem/acc"} <= set(metrics)
    assert "heldout/records" not in metrics and "train/final_loss" not in metrics  # only the sweep ran
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:  # the sweep is a Prefect flow run, tagged on the MLflow run
        flow_run = prefect.read_flow_run(parent.data.tags["prefect.flow_run_id"])
    assert flow_run.state.is_completed() and flow_run.name == parent.data.tags["prefect.flow_run_name"]
    again = runner.invoke(app, args)  # both models carry a digest: the second sweep is all cache
    assert again.exit_code == 0, again.output
    [latest, _] = client.search_runs([parent.info.experiment_id], "tags.mlflow.runName LIKE 'smoke-eval-%'",
                                     order_by=["attributes.start_time DESC"])
    assert latest.data.metrics["eval/base/cached_tasks"] == 2 and latest.data.metrics["eval/model/evaluated_tasks"] == 0


def test_eval_names_a_model_that_does_not_exist():
    result = runner.invoke(app, ["eval", "configs/smoke.yaml", "--model", "no/such-model"])
    assert result.exit_code == 2 and "no/such-model" in result.output and "offline" in result.output  # a user error


def test_eval_takes_a_lora_adapter_folder_on_the_configs_base(tmp_path, tiny_model):
    from mlflow.tracking import MlflowClient
    from peft import LoraConfig, get_peft_model

    from sftflow.models import load_causal_lm, model_digest
    from sftflow.tasks.evaluation.benchmarks import sweep_models

    # A fresh LoRA adapter: B starts at zero, so it computes exactly what the base computes.
    peft_model = get_peft_model(load_causal_lm(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    models = sweep_models(str(tmp_path / "adapter"), tiny_model, offline=True, baseline=True)
    assert models["model"] == {"path": tiny_model, "adapter": str(tmp_path / "adapter"), "tokenizer": tiny_model,
                               "digest": model_digest(tiny_model, str(tmp_path / "adapter"))}
    args = ["eval", "configs/smoke.yaml", "--model", str(tmp_path / "adapter"), "--baseline",
            "--set", f"model.base={tiny_model}", "--set", "eval.mmlu.subtasks=[virology]",
            "--set", "eval.bbh.enabled=false", "--set", "tracking.experiment=cli-eval-adapter"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("cli-eval-adapter").experiment_id],
                                  "tags.mlflow.runName LIKE 'smoke-eval-%'")
    m = parent.data.metrics
    assert m["eval/model/evaluated_tasks"] == 1  # new adapter weights: evaluated, then cached by their digest
    assert m["forgetting/model/mmlu/delta"] == 0.0 and m["eval/model/mmlu/acc"] == m["eval/base/mmlu/acc"]
