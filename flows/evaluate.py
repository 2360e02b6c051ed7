"""`sftflow eval`: one model's benchmark sweep, optionally against the config's base model (forgetting with CIs),
as a Prefect flow with its own parent MLflow run, like the whole pipeline's."""

from __future__ import annotations

import uuid

from prefect import flow

from sftflow.configs.schema import PipelineConfig
from sftflow.stack.entry import FlowEntry
from sftflow.tasks.evaluation.benchmarks import benchmarks, sweep_models


def _run_name() -> str:
    return f"eval-{uuid.uuid4().hex[:8]}"


@flow(name="sftflow-eval", flow_run_name=_run_name)
def evaluate_model(config: PipelineConfig, model: str, baseline: bool = False) -> dict:
    """model: registry alias, model folder, LoRA adapter folder (on config.model.base), .gguf file or hub id.
    Returns the sweep's metrics and forgetting rows, the swept model tags, the run dir and the parent MLflow run."""
    entry = FlowEntry()
    state = entry.admit(config)
    models = sweep_models(model, config.model.base, config.offline, baseline)
    with entry.parent_run(config, state) as ctx:
        result = benchmarks.task(ctx, models, config.eval, trust_remote_code=config.model.trust_remote_code)
    return {"metrics": result["metrics"], "forgetting": result.get("forgetting", {}), "models": list(models),
            "run_dir": ctx.run_dir, "mlflow_run_id": ctx.parent_run_id}
