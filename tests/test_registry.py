"""MLflow model registry on the test's SQLite store: candidates, gate verdicts, champion/challenger,
promote and rollback."""

import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sftflow.release import registry

# The folder the train stage saves per method (tests/test_train.py checks lora and full against real training).
SAVED = {"lora": "adapter", "qlora": "adapter", "full": "model", "frozen": "model"}


def trained_weights(dest, kind: str, r: int = 4, seed: int = 0):
    """What the train stage saves, from the tiny model: a LoRA adapter (with the tokenizer and chat template;
    lora_B nudged off zero so the adapter changes the output) or a whole model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sftflow.models import load_causal_lm, load_tokenizer, pull

    base = str(pull("tiny-random-llama"))
    model = load_causal_lm(base)
    if kind == "adapter":
        model = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)
    model.save_pretrained(dest, safe_serialization=True)
    load_tokenizer(base).save_pretrained(dest)
    return dest


def pipeline_run(tmp_path, method="lora", r=4, metrics=None) -> str:
    """A parent run shaped like the pipeline's (params, metrics) with a `train` child holding real weights."""
    exp = mlflow.set_experiment("registry-test")
    kind = SAVED[method]
    weights = trained_weights(tmp_path / uuid.uuid4().hex / kind, kind, r=r)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"run-r{r}") as parent:
        mlflow.log_params({"train.method": method, "model.base": "tiny-random-llama", "train.lora.r": r})
        mlflow.log_metrics(metrics or {"heldout/delta/label_acc": 0.1})
        with mlflow.start_run(run_name="train", nested=True, tags={"sftflow.stage": "train"}):
            mlflow.log_artifacts(str(weights), artifact_path=kind)
    return parent.info.run_id


def fp(tag: str) -> dict:
    return {"fingerprint": f"fp-{tag}", "dataset_digest": f"data-{tag}", "config_hash": f"cfg-{tag}"}


PASS, FAIL = {"passed": True, "reasons": ["held-out gain +0.1 > 0"]}, {"passed": False, "reasons": ["no gain"]}


@pytest.fixture
def name():
    return f"pipe-{uuid.uuid4().hex[:8]}"


def test_a_passing_candidate_becomes_champion_with_its_tags(tmp_path, name):
    run_id = pipeline_run(tmp_path)
    v = registry.register_candidate(name, run_id, PASS, fp("a"), {"held-out label_acc": 0.1})
    client = MlflowClient()
    assert int(v.version) == 1 and int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert v.tags["gate.passed"] == "true" and "held-out gain" in v.tags["gate.reasons"]
    assert v.tags["sftflow.dataset_digest"] == "data-a" and v.tags["sftflow.config_hash"] == "cfg-a"
    assert '"held-out label_acc": 0.1' in v.tags["sftflow.eval_summary"]
    # the train stage's run holds the weights; the version is its logged MLflow Model
    assert v.source.startswith("models:/m-") and v.run_id != run_id
    # the challenger alias is only for candidates that are not champion
    with pytest.raises(Exception):
        client.get_model_version_by_alias(name, "challenger")
    assert int(registry.find_version(name, "fp-a").version) == 1 and registry.find_version(name, "fp-b") is None


def test_a_failing_candidate_is_challenger_and_leaves_the_champion(tmp_path, name):
    registry.register_candidate(name, pipeline_run(tmp_path), PASS, fp("a"), {})
    v2 = registry.register_candidate(name, pipeline_run(tmp_path, r=8), FAIL, fp("b"), {})
    client = MlflowClient()
    assert v2.tags["gate.passed"] == "false"
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2


def test_a_candidate_judged_against_a_champion_that_was_replaced_meanwhile_stays_challenger(tmp_path, name):
    # two retrains started while v1 was champion; the first to finish replaced it
    registry.register_candidate(name, pipeline_run(tmp_path), PASS, fp("a"), {})
    judged_v1 = {**PASS, "champion": {"version": "1"}}
    assert int(registry.register_candidate(name, pipeline_run(tmp_path, r=8), judged_v1, fp("b"), {}).version) == 2
    assert int(registry.champion(name).version) == 2
    late = registry.register_candidate(name, pipeline_run(tmp_path, r=16), judged_v1, fp("c"), {})
    assert int(registry.champion(name).version) == 2 and late.aliases == ["challenger"]
    assert late.tags["sftflow.judged_against"] == "v1"
    note = "champion changed while judged (against v1; champion is now v2)"
    assert note in late.tags["sftflow.promotion"] and note in late.tags["gate.reasons"]
    # a candidate judged before any champion existed, registered after one appeared, is not promoted either
    other = f"{name}-b"
    registry.register_candidate(other, pipeline_run(tmp_path), PASS, fp("d"), {})
    unjudged = registry.register_candidate(other, pipeline_run(tmp_path, r=8), PASS, fp("e"), {})
    assert int(registry.champion(other).version) == 1 and "the base only" in unjudged.tags["sftflow.promotion"]


def test_promote_the_challenger_then_roll_back(tmp_path, name):
    registry.register_candidate(name, pipeline_run(tmp_path), PASS, fp("a"), {})
    registry.register_candidate(name, pipeline_run(tmp_path, r=8), FAIL, fp("b"), {})
    promoted = registry.promote(name)  # a human overrides the gate
    assert int(promoted.version) == 2 and int(registry.champion(name).version) == 2
    assert "challenger" not in MlflowClient().get_model_version(name, "2").aliases
    assert int(registry.rollback(name).version) == 1 and int(registry.champion(name).version) == 1
    with pytest.raises(registry.RegistryError, match="replaced no earlier champion"):
        registry.rollback(name)


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "frozen"])
def test_each_method_registers_the_folder_training_saved(tmp_path, name, method):
    v = registry.register_candidate(name, pipeline_run(tmp_path, method=method), PASS, fp("a"), {})
    assert v.source.startswith("models:/m-") and v.tags["sftflow.kind"] == SAVED[method]
    logged = MlflowClient().get_logged_model(v.source.removeprefix("models:/"))
    assert logged.source_run_id == v.run_id and logged.tags["sftflow.kind"] == SAVED[method]


def test_clear_errors(tmp_path, name):
    with pytest.raises(registry.RegistryError, match="no challenger"):
        registry.promote(name)
    registry.register_candidate(name, pipeline_run(tmp_path), PASS, fp("a"), {})
    with pytest.raises(registry.RegistryError, match="no version 7"):
        registry.promote(name, "7")
    with mlflow.start_run() as bare:
        pass
    with pytest.raises(registry.RegistryError, match="no `train` stage run"):
        registry.register_candidate(name, bare.info.run_id, PASS, fp("x"), {})
