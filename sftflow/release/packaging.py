"""The fine-tuned model as an MLflow Model: transformers flavor, chat task, one LoggedModel per `train` run.

A LoRA/QLoRA run is logged as base + PEFT adapter, a `merge_adapter` or full run as plain weights; either way
with the tokenizer and the chat template it was trained with, a chat signature and an input example, and the
weights inside the artifact (safetensors only), so `models:/NAME@champion` loads and serves anywhere without
the hub or the training machine's folders. The LoggedModel carries the run's held-out and forgetting metrics.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sftflow.errors import UserError
from sftflow.stack.fence import PICKLE_SUFFIXES
from sftflow.tracking import EXPERIMENT_KIND

TASK = "llm/v1/chat"  # OpenAI-style chat requests; MLflow applies the tokenizer's chat template
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}
# Greedy by default, as the held-out evaluation generates: a served answer is the evaluated answer.
MODEL_CONFIG = {"do_sample": False}
LINKED_METRICS = ("heldout/", "forgetting/")
WEIGHT_FOLDERS = ("merged", "adapter", "model")  # what the train stage saved, most servable first
REQUIREMENTS = ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors")


class PackagingError(UserError, RuntimeError):
    pass


def save_model(path, mlflow_model=None, transformers_model=None, base_model_path=None, **kwargs):
    """Flavor hook for `Model.log`: MLflow's transformers flavor, with a PEFT model's base weights stored clean.

    MLflow saves a PEFT model's base with the adapter layers injected (transformers 5 then cannot load it),
    unless the base is only referenced by a local path; store the referenced base's own weights in the
    artifact instead and point the flavor at them, so the model needs neither that path nor the hub.
    """
    import mlflow.transformers
    from mlflow.transformers.flavor_config import FlavorKey
    from mlflow.utils.file_utils import get_total_file_size

    mlflow.transformers.save_model(transformers_model, path, mlflow_model=mlflow_model,
                                   base_model_path=base_model_path, **kwargs)
    if base_model_path is None:
        return
    from sftflow.models import load_causal_lm

    load_causal_lm(base_model_path).save_pretrained(Path(path) / "model", safe_serialization=True)
    flavor = mlflow_model.flavors["transformers"]
    flavor.pop(FlavorKey.MODEL_LOCAL_BASE)
    flavor[FlavorKey.MODEL_BINARY] = "model"
    mlflow_model.model_size_bytes = get_total_file_size(path)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def requirements(adapter: bool) -> list[str]:
    out = []
    for name in REQUIREMENTS:
        if name == "peft" and not adapter:
            continue
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _weights(client, run_id: str, dest: Path) -> Path:
    """The train run's servable folder, downloaded; pickle files are refused (safetensors only)."""
    from mlflow.artifacts import download_artifacts

    present = {a.path for a in client.list_artifacts(run_id)}
    folder = next((f for f in WEIGHT_FOLDERS if f in present), None)
    if folder is None:
        raise PackagingError(f"MLflow run {run_id} holds no trained weights ({', '.join(WEIGHT_FOLDERS)})")
    local = Path(download_artifacts(run_id=run_id, artifact_path=folder, dst_path=str(dest)))
    if pickles := sorted(p.name for p in local.rglob("*") if p.suffix in PICKLE_SUFFIXES):
        raise PackagingError(f"MLflow run {run_id}: {folder}/ holds pickle files ({', '.join(pickles)}); "
                             "only safetensors weights are packaged")
    return local


def _base_of(adapter: Path) -> str:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not Path(base).is_dir():
        raise PackagingError(f"the adapter's base model {base!r} is not a folder on this machine: package the "
                             "candidate where it was trained (or with its base model at the same path)")
    return base


def logged_model(client, train_run_id: str):
    """The LoggedModel already logged from this train run, or None."""
    import mlflow

    run = client.get_run(train_run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{train_run_id}'")
    return max(found, key=lambda m: m.creation_timestamp, default=None)


def link_metrics(client, model_id: str, run_id: str, metrics: dict[str, float]) -> dict[str, float]:
    """Log the run's held-out and forgetting metrics onto the LoggedModel (its metrics tab, model comparison)."""
    import time

    from mlflow.entities import Metric

    linked = {k: float(v) for k, v in metrics.items() if k.startswith(LINKED_METRICS)}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=model_id) for k, v in linked.items()])
    return linked


def log_train_model(client, parent_run_id: str, train_run_id: str, name: str = "model"):
    """Log the train run's weights as an MLflow Model (once per train run) -> the LoggedModel."""
    from mlflow.models import Model

    from sftflow.models import load_causal_lm, load_tokenizer

    if (existing := logged_model(client, train_run_id)) is not None:
        return existing
    parent = client.get_run(parent_run_id)
    client.set_experiment_tag(parent.info.experiment_id, *EXPERIMENT_KIND)
    with tempfile.TemporaryDirectory(prefix="sftflow-package-") as tmp:
        weights = _weights(client, train_run_id, Path(tmp))
        adapter = (weights / "adapter_config.json").exists()
        base = _base_of(weights) if adapter else None
        model = load_causal_lm(base or str(weights), adapter=str(weights) if adapter else None)
        metadata = {"sftflow.pipeline_run_id": parent_run_id, "sftflow.kind": "adapter" if adapter else "model",
                    "sftflow.base_model": parent.data.params.get("model.base", "")}
        info = Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__], run_id=train_run_id,
                         transformers_model={"model": model, "tokenizer": load_tokenizer(str(weights))},
                         task=TASK, input_example=INPUT_EXAMPLE, model_config=MODEL_CONFIG, metadata=metadata,
                         pip_requirements=requirements(adapter), base_model_path=base,
                         tags={"sftflow.kind": metadata["sftflow.kind"]})
    link_metrics(client, info.model_id, parent_run_id, parent.data.metrics)
    return client.get_logged_model(info.model_id)
