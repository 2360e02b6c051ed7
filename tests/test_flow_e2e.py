"""The smoke config through the real Prefect flow (ephemeral server) and MLflow (SQLite), end to end."""

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sftflow.configs.loader import load_config

REPO = Path(__file__).resolve().parents[1]
STAGES = {"load", "curate", "split", "model", "template", "train", "heldout", "benchmarks", "gate", "report"}


@pytest.fixture(scope="module")
def smoke_run(prefect_server, data_root):
    from sftflow.flows.sft_pipeline import sft_pipeline

    cfg = load_config(REPO / "configs/smoke.yaml", [f"data.root={data_root}"])
    state = sft_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state
    return cfg, state.result(), state.state_details.flow_run_id


@pytest.mark.e2e
def test_mlflow_records_a_parent_run_with_a_child_per_stage(smoke_run):
    cfg, result, flow_run_id = smoke_run
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert parent.data.params["train.method"] == "lora" and parent.data.params["model.base"] == "tiny-random-llama"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == STAGES
    for name in ("eval/base/mmlu/acc", "eval/ft/bbh/exact_match", "forgetting/mmlu/delta", "heldout/ft/exact_match",
                 "forgetting/mmlu/ci_low", "forgetting/mmlu/ci_high", "forgetting/bbh/p_value",
                 "forgetting/mmlu_stem/delta", "forgetting/mmlu/anatomy/delta", "eval/ft/mmlu_other/acc",
                 "heldout/delta/label_acc/ci_low", "heldout/ft/macro_f1", "gate/passed",
                 "train/final_loss", "curate/kept", "split/train", "load/records", "template/train/trained_share"):
        assert name in parent.data.metrics, name
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    by_name = {c.info.run_name: c for c in children}
    split_artifacts = {a.path for a in client.list_artifacts(by_name["split"].info.run_id)}
    assert {"curation_report.json", "curation_report.md"} <= split_artifacts
    assert sorted(i.dataset.name for i in client.get_run(by_name["split"].info.run_id).inputs.dataset_inputs) == \
        ["test", "train", "val"]
    expected = {"split": ["manifest.json"], "curate": ["curation_counts.json"], "train": ["training_curves.png"],
                "benchmarks": ["benchmarks.json", "forgetting.json", "forgetting_ft.md", "forgetting_ft.png",
                               "forgetting_ft_subtasks.png"],
                "heldout": ["predictions.jsonl", "examples.md", "heldout.json"], "gate": ["gate.json"],
                "report": ["summary.json", "summary.md"]}
    for stage, artifacts in expected.items():
        assert set(artifacts) <= {a.path for a in client.list_artifacts(by_name[stage].info.run_id)}, stage
    verdict = "passed" if result["gate"]["passed"] else "failed"
    assert parent.data.tags["sftflow.gate"] == by_name["gate"].data.params["gate.verdict"] == verdict
    assert parent.data.metrics["gate/passed"] == float(result["gate"]["passed"]) and result["gate"]["reasons"]
    adapter = {a.path for a in client.list_artifacts(by_name["train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    assert len(client.get_metric_history(by_name["train"].info.run_id, "train/loss")) >= 2


@pytest.mark.e2e
def test_counts_add_up_and_summary_covers_every_measure(smoke_run):
    _, result, _ = smoke_run
    m = MlflowClient().get_run(result["mlflow_run_id"]).data.metrics
    assert m["load/records"] == m["curate/kept"] + m["curate/rejected"] + m["curate/exact_dup"] + m["curate/near_dup"] == 80
    assert m["curate/kept"] == m["split/train"] + m["split/val"] + m["split/test"] + m["split/contaminated"]
    assert m["data/records_in"] == sum(m[f"data/{k}"] for k in ("kept", "rejected", "exact_dup", "near_dup",
                                                                 "contaminated"))
    assert m["template/train/records"] + m["template/val/records"] + m["template/rejected"] == \
        m["split/train"] + m["split/val"]
    assert {r["measure"] for r in result["rows"]} == {"held-out exact_match", "held-out label_acc", "held-out macro_f1",
                                                      "mmlu acc", "mmlu_stem acc", "mmlu_other acc", "bbh exact_match"}
    assert all(r["ci_low"] <= r["delta"] <= r["ci_high"] for r in result["rows"])
    assert result["eval_timing"].startswith("Evaluation wall time: held-out") and "tasks cached" in result["eval_timing"]
    assert Path(result["run_dir"], "report", "summary.md").exists()


@pytest.mark.e2e
def test_prefect_knows_the_run_and_its_mlflow_link(smoke_run):
    from prefect import get_client

    _, result, flow_run_id = smoke_run
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts()
    assert run.state.is_completed()
    summary = [a for a in artifacts if a.key == "sftflow-summary" and a.flow_run_id == flow_run_id]
    curation = [a for a in artifacts if a.key == "sftflow-curation" and a.flow_run_id == flow_run_id]
    assert curation and "records in" in curation[0].data
    assert summary and result["mlflow_run_id"] in summary[0].data and "Promotion gate" in summary[0].data
    forgetting = [a for a in artifacts if a.key == "sftflow-forgetting" and a.flow_run_id == flow_run_id]
    assert forgetting and forgetting[0].type == "table" and "mmlu/anatomy" in forgetting[0].data


@pytest.mark.e2e
def test_each_prefect_task_logs_its_stage_summary(smoke_run):
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    _, _, flow_run_id = smoke_run
    logs: dict[str, str] = {}
    for _ in range(20):  # Prefect's API handler ships logs in the background
        with get_client(sync_client=True) as client:
            found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
        logs = {log.message.split(":")[0]: log.message for log in found if log.task_run_id
                and log.message.split(":")[0] in STAGES}
        if set(logs) == STAGES:
            break
        time.sleep(0.5)
    assert set(logs) == STAGES, logs
    assert "80 records, 0 rejected" in logs["load"] and "80 kept" in logs["curate"]
    assert "train 59 / val 8 / test 13" in logs["split"]  # the hash draw of each group, seed 0
    assert "6 steps, final loss" in logs["train"] and "label_acc: base" in logs["heldout"]
    assert ", attention varlen_rows (" in logs["train"] or ", attention flash_attention_2" in logs["train"]
    # Which precision ran and why: the suite's CPUs all run fp32 (SFTFLOW_CPU_BF16=0), a GPU its own.
    assert re.search(r", (fp32|bf16|fp16) \(auto: ", logs["train"]), logs["train"]
    for stage in ("heldout", "benchmarks"):
        assert re.search(r", (float32|bfloat16) \(auto: ", logs[stage]), logs[stage]
    assert "mmlu acc: base" in logs["benchmarks"] and "tasks cached" in logs["benchmarks"]
    assert logs["gate"].endswith("failed") or logs["gate"].endswith("passed")


@pytest.mark.e2e
def test_an_unchanged_second_run_gets_its_own_directory_and_trains_and_evaluates_nothing(smoke_run, data_root):
    from sftflow.flows.sft_pipeline import sft_pipeline

    cfg, first, _ = smoke_run
    second = sft_pipeline(config=cfg)
    assert second["run_dir"] != first["run_dir"] and Path(first["run_dir"], "train", "adapter").exists()
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    m = MlflowClient().get_run(second["mlflow_run_id"]).data.metrics
    assert m["eval/base/cached_tasks"] == 4 and m["eval/base/evaluated_tasks"] == 0 and m["eval/base/wall_s"] == 0
    # The fine-tuned model is the same content: read from the cache like the base, held-out comparison included.
    assert m["train/cache_hit"] == 1 and m["eval/ft/cached_tasks"] == 4 and m["eval/ft/evaluated_tasks"] == 0
    assert m["heldout/cache_hit"] == 1 and m["eval/ft/wall_s"] == 0
    assert Path(second["run_dir"], "heldout", "predictions.jsonl").read_text() == \
        Path(first["run_dir"], "heldout", "predictions.jsonl").read_text()
