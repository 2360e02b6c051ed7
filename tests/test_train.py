import json

import mlflow
import pytest
from conftest import make_record
from safetensors.torch import load_file

from sftflow.configs.schema import TemplateConfig, TrainConfig
from sftflow.records import write_jsonl
from sftflow.tasks.template import template
from sftflow.tasks.train import train


@pytest.fixture(scope="module")
def token_paths(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tok")
    recs = [make_record(i, f"Review {i}: {'great' if i % 2 else 'awful'} film.", "POS" if i % 2 else "NEG")
            for i in range(24)]
    write_jsonl(d / "train.jsonl", recs[:20])
    write_jsonl(d / "val.jsonl", recs[20:])
    out = template({"train": str(d / "train.jsonl"), "val": str(d / "val.jsonl")}, tiny_model,
                   TemplateConfig(max_length=256), out_dir=d)
    return out["paths"]


def run_train(tmp_path, token_paths, tiny_model, **cfg):
    with mlflow.start_run(run_name="unit-train"):
        return train(token_paths, tiny_model, TrainConfig(**cfg), out_dir=tmp_path)


def test_lora_trains_only_adapters_learns_and_saves_safetensors(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="lora", lora={"r": 4, "alpha": 8},
                    learning_rate=5e-3, max_steps=30, batch_size=4, logging_steps=5, warmup_ratio=0.0)
    m = out["metrics"]
    assert 0 < m["train/trainable_params"] < m["train/total_params"] / 5
    assert m["train/steps"] == 30 and m["train/tokens_seen"] > 0
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns the two labels
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not list(adapter.glob("*.bin"))
    assert out["adapter_path"] == str(adapter) and out["model_path"] == tiny_model
    assert (adapter / "tokenizer_config.json").exists()
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_full_fine_tuning_trains_every_weight(tmp_path, token_paths, tiny_model):
    out = run_train(tmp_path, token_paths, tiny_model, method="full", learning_rate=1e-3, max_steps=4,
                    batch_size=4, logging_steps=2)
    assert out["metrics"]["train/trainable_params"] == out["metrics"]["train/total_params"]
    assert out["adapter_path"] is None
    weights = load_file(tmp_path / "model" / "model.safetensors")
    base = load_file(f"{tiny_model}/model.safetensors")
    changed = [k for k in base if not (weights[k] == base[k]).all()]
    assert changed, "full fine-tuning left every weight unchanged"


def test_step_metrics_reach_the_active_mlflow_run(tmp_path, token_paths, tiny_model):
    with mlflow.start_run(run_name="unit-curves") as run:
        train(token_paths, tiny_model, TrainConfig(max_steps=4, batch_size=4, logging_steps=2, eval_steps=2),
              out_dir=tmp_path)
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert client.get_metric_history(run.info.run_id, "train/eval_loss")
