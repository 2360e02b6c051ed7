"""Retraining: the flow behind both deployments (nightly schedule and ad-hoc runs from the Prefect UI).

fingerprint data + config -> unchanged since the last registered candidate? finish "up to date" ->
otherwise run the whole SFT pipeline -> promotion gate -> register the candidate (the gate moves `champion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.states import Completed

from sftflow import cache, links
from sftflow.configs.loader import load_config
from sftflow.configs.schema import PipelineConfig, Source
from sftflow.release import registry
from sftflow.stack.entry import FlowEntry

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_path(config_file: str) -> Path:
    path = Path(config_file).expanduser()
    if not path.is_absolute() and not path.exists() and (PACKAGED_CONFIGS / path.name).exists():
        path = PACKAGED_CONFIGS / path.name
    return path


def resolve_config(config_file: str, overrides: list[str], model: str | None, method: str | None,
                   sources: list[Source] | None) -> PipelineConfig:
    """The run's config: a YAML file (relative to the working directory, else a shipped config by name)
    with `--set`-style overrides, then the form's model/method/sources fields on top."""
    path = config_path(config_file)
    extra = [*(overrides or []), *([f"model.base={model}"] if model else []),
             *([f"train.method={method}"] if method else [])]
    cfg = load_config(path, extra)
    if sources:
        cfg.data.sources = [Source.model_validate(s) for s in sources]
    return cfg


def fingerprint(cfg: PipelineConfig) -> dict:
    """What a trained candidate depends on: the data sources' file contents and the resolved config.

    Hub sources count by id and split (their content is not fetched just to hash it).
    """
    from sftflow.tasks.data.load import source_files

    root = Path(cfg.data.root)
    data = [{"hub": s.hub, "split": s.split} if s.hub else [Path(f) for f in source_files(s, root)]
            for s in cfg.data.sources]
    dataset_digest, config_hash = cache.key(data), cfg.digest()
    return {"fingerprint": cache.key(dataset_digest, config_hash), "dataset_digest": dataset_digest,
            "config_hash": config_hash}


def register(cfg: PipelineConfig, result: dict, fp: dict | None = None):
    """Register a pipeline run's candidate; its gate verdict (against the base and the champion it faced)
    decides whether it becomes champion."""
    return registry.register_candidate(cfg.name, result["mlflow_run_id"], result["gate"], fp or fingerprint(cfg),
                                       {r["measure"]: round(r["delta"], 4) for r in result["rows"]})


@flow(name="sftflow-retrain")
def retrain(config_file: str = "configs/demo.yaml", overrides: list[str] | None = None, model: str | None = None,
            method: Literal["lora", "full"] | None = None, sources: list[Source] | None = None,
            force: bool = False):
    """Fine-tune and evaluate unless data and config are unchanged since the last registered candidate.

    Args:
        config_file: pipeline config YAML (relative to the worker's project directory, or a shipped one by name)
        overrides: `key.path=value` overrides, as `sftflow run --set` takes them
        model: base model (registry alias, local folder, .gguf or hub id); empty keeps the config's
        method: fine-tuning method; empty keeps the config's
        sources: data sources replacing the config's (local path/glob under data.root, or hub id)
        force: train even when data and config are unchanged
    """
    import mlflow

    from sftflow.flows.sft_pipeline import sft_pipeline
    from sftflow.tasks.evaluation.report import to_markdown

    logger = get_run_logger()
    # Started from a deployment (UI form, API): the deployment's own policy bounds what the form may ask for.
    entry = FlowEntry()
    entry.check_files(config_path(config_file), shipped=PACKAGED_CONFIGS)
    cfg = resolve_config(config_file, overrides or [], model, method, sources)
    entry.admit(cfg)
    fp = fingerprint(cfg)
    known = None if force else registry.find_version(cfg.name, fp["fingerprint"])
    if known is not None:
        message = (f"up to date: data and config unchanged since `{cfg.name}` v{known.version} "
                   f"(fingerprint {fp['fingerprint'][:12]}); nothing trained")
        logger.info(message)
        run_id = known.tags.get("mlflow.parent_run_id", "")
        run_url = links.mlflow_run_url(mlflow.get_run(run_id).info.experiment_id, run_id) if run_id else None
        create_markdown_artifact(key="sftflow-retrain", markdown=f"## {message}\n\nMLflow run of v{known.version}: "
                                 f"{run_url or run_id}\n", description="retrain outcome")
        return Completed(name="UpToDate", message=message)

    result = sft_pipeline(config=cfg)
    verdict = result["gate"]  # the pipeline's promotion gate (tasks/evaluation/gate.py) decides
    version = register(cfg, result, fp)
    run_url = links.mlflow_run_url(result["experiment_id"], result["mlflow_run_id"])
    if root_url := links.prefect_flow_run_url():
        mlflow.MlflowClient().set_tag(result["mlflow_run_id"], "prefect.root_flow_run_url", root_url)
    if run_url:
        create_link_artifact(key="mlflow-run", link=run_url, link_text=f"MLflow run {result['mlflow_run_id']}",
                             description="the MLflow run of this flow run")
    champion = registry.champion(cfg.name)
    create_markdown_artifact(
        key="sftflow-retrain",
        markdown=(f"## `{cfg.name}` v{version.version} registered\n\n"
                  f"MLflow run: {run_url or result['mlflow_run_id']}\n\n"
                  f"Gate: **{'passed' if verdict['passed'] else 'failed'}** — {'; '.join(verdict['reasons'])}\n\n"
                  f"Champion: v{champion.version if champion else '(none)'}\n\n{to_markdown(result['rows'])}\n"),
        description="candidate, gate verdict, champion and the summary table")
    logger.info(f"{cfg.name} v{version.version}: gate {'passed' if verdict['passed'] else 'failed'}")
    return {**result, "model_version": version.version, "verdict": verdict, "fingerprint": fp}
