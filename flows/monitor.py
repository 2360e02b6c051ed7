"""Monitoring: score the champion on fresh labelled traffic; on a drop beyond the margin, start the retrain
deployment with the new data as one more source. A champion that holds up is left alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftflow import env
from sftflow.configs.schema import PipelineConfig
from sftflow.errors import UserError
from sftflow.flows.retrain import PACKAGED_CONFIGS, config_path, resolve_config
from sftflow.stack.entry import FlowEntry


def retrain_sources(cfg: PipelineConfig, data: Path) -> list[dict]:
    """The config's sources plus the new data (absolute: it need not lie under data.root)."""
    return [*(s.model_dump(mode="json", exclude_none=True) for s in cfg.data.sources),
            {"path": str(data.resolve()), "name": f"monitor-{data.stem}"}]


def admit_traffic(data: Path) -> Path:
    """A copy of the traffic file in the state dir's admitted-traffic folder, named by its content: the retrain
    run reads the copy, which its own fence accepts (fence.py), wherever users keep their traffic."""
    from sftflow import cache
    from sftflow.stack.fence import admitted_traffic

    folder = admitted_traffic()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{cache.file_digest(data)[:16]}-{data.name}"
    if not target.exists():
        tmp = folder / f".{target.name}.{os.getpid()}.tmp"
        shutil.copyfile(data, tmp)
        os.replace(tmp, target)
    return target


def start_retrain(deployment: str, config_file: str, overrides: list[str], sources: list[dict]):
    """A flow run of the retrain deployment (not awaited: a worker runs it) -> the flow run."""
    from prefect.deployments import run_deployment

    try:
        return run_deployment(name=deployment, parameters={"config_file": config_file, "overrides": overrides,
                                                           "sources": sources}, timeout=0)
    except Exception as exc:  # ObjectNotFound, no server: say which deployment and how to create it
        raise UserError(f"could not start retrain deployment {deployment!r} ({type(exc).__name__}: {exc}); "
                        "apply it with `sftflow deploy` against the running Prefect server (`sftflow up`)") from exc


@task(name="monitor-check")
def check_task(cfg: PipelineConfig, data: str) -> dict:
    from sftflow.release.monitoring import check

    out = env.state_dir() / "monitor" / f"{cfg.name}-{flow_run.name or 'local'}"
    return check(cfg, Path(data), out)


@flow(name="sftflow-monitor")
def monitor(config_file: str, data: str, overrides: list[str] | None = None) -> dict:
    """Score the champion on new labelled data; retrain when it dropped.

    Args:
        config_file: the pipeline config whose champion (`name`) is monitored
        data: JSONL of fresh labelled traffic, in any format the load stage reads
        overrides: `key.path=value` overrides, as `sftflow run --set` takes them
    """
    logger = get_run_logger()
    entry = FlowEntry()
    entry.check_files(config_path(config_file), shipped=PACKAGED_CONFIGS)
    entry.check_files(Path(data))
    cfg = resolve_config(config_file, overrides or [], None, None, None)
    entry.admit(cfg)  # what the form's overrides made of it
    verdict = check_task(cfg, data)
    logger.info(verdict["reason"])
    retrain_run = None
    if verdict["dropped"] and cfg.monitor.retrain_deployment:
        retrain_run = start_retrain(cfg.monitor.retrain_deployment, config_file, overrides or [],
                                    retrain_sources(cfg, admit_traffic(Path(data))))
        logger.info(f"started {cfg.monitor.retrain_deployment} flow run {retrain_run.name} ({retrain_run.id})")
    create_markdown_artifact(
        key="sftflow-monitor",
        markdown=(f"## `{cfg.name}` v{verdict['version']}: {'**dropped**' if verdict['dropped'] else 'holds up'}\n\n"
                  f"{verdict['reason']}\n\n{verdict['records']} records scored, {verdict['rejected']} rejected; "
                  f"MLflow run `{verdict['mlflow_run_id']}`\n\n"
                  + (f"Retrain flow run: `{retrain_run.name}` ({retrain_run.id})\n" if retrain_run else "")),
        description="monitor verdict")
    return {**verdict, "retrain_flow_run_id": str(retrain_run.id) if retrain_run else None}
