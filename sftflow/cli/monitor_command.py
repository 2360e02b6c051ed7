"""`sftflow monitor CONFIG --data NEW.jsonl`: one monitoring check of the config's champion, as a Prefect flow run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sftflow.cli.terminal import console


def monitor(config: Annotated[Path, typer.Argument(help="pipeline config YAML whose champion (`name`) is monitored")],
            data: Annotated[Path, typer.Option(help="fresh labelled traffic (JSONL, any format the load stage reads)")],
            set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: key.path=value")] = None,
            ) -> None:
    """Score the champion on new labelled data against its own held-out score; on a drop beyond
    `monitor.margin` start the retrain deployment with the data as a new source (exit 1 on a drop)."""
    from sftflow.configs.loader import load_config
    from sftflow.stack import servers

    cfg = load_config(config, set_ or [])  # validated before any work starts
    servers.use()  # after `sftflow up`: its Prefect (where the retrain deployment lives) and MLflow
    from sftflow import env

    env.configure(cfg.offline)
    env.start_local_prefect()
    from sftflow.flows.monitor import monitor as monitor_flow

    result = monitor_flow(config_file=str(config), data=str(data), overrides=set_ or [])
    colour = "red" if result["dropped"] else "green"
    console.print(f"[{colour}]{cfg.name} v{result['version']}: {'dropped' if result['dropped'] else 'holds up'}[/] "
                  f"- {result['reason']}", soft_wrap=True)
    console.print(f"{result['records']} records scored, {result['rejected']} rejected; "
                  f"MLflow run {result['mlflow_run_id']}")
    if result["retrain_flow_run_id"]:
        console.print(f"retrain flow run started: {result['retrain_flow_run_id']}")
    if result["dropped"]:
        raise typer.Exit(1)
