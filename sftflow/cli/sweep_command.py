"""`sftflow sweep CONFIG SPACE`: a hyperparameter sweep under the forgetting constraint, as one Prefect flow run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sftflow.cli import terminal
from sftflow.cli.terminal import RunOutput, console


def sweep(config: Annotated[Path, typer.Argument(help="pipeline config YAML, e.g. configs/demo.yaml")],
          space: Annotated[Path, typer.Argument(help="sweep space YAML, e.g. configs/sweep_demo.yaml")],
          n_trials: Annotated[Optional[int], typer.Option("--n-trials", "-n", min=1,
                                                          help="trials in all (default: the space file's)")] = None,
          register: Annotated[bool, typer.Option(help="register the best trial that passes the gate as "
                                                      "challenger")] = False,
          set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override for every trial: "
                                                            "key.path=value (repeatable)")] = None) -> None:
    """Search the space's hyperparameters for the largest held-out gain without forgetting beyond the gate's
    allowance; each trial is a whole pipeline run nested under one MLflow sweep run. Rerun the same command to
    resume a killed sweep (finished trials are kept)."""
    terminal.quiet_prefect()
    from sftflow.configs.loader import load_config
    from sftflow.stack import servers
    from sftflow.sweeps.space import every_trial, load_spec

    spec = load_spec(space, n_trials)  # both files validated before any work starts
    cfg = load_config(config, every_trial(spec, set_ or []))
    servers.use()
    from sftflow import env

    env.configure(cfg.offline)
    from sftflow.flows.sweep import sweep as sweep_flow

    with RunOutput("sweep"):  # every trial's stage lines on the terminal, library chatter in the log
        result = sweep_flow(config_file=str(config), space_file=str(space), n_trials=n_trials,
                            overrides=set_ or [], register_best=register)
    console.print(result["table"], soft_wrap=True, highlight=False)
    best = result["best"]
    console.print(f"best trial passing the gate: {best['trial']} {best['params']} (MLflow run {best['run_id']})"
                  if best else "[red]no trial passes the gate[/]", soft_wrap=True)
    if result["registered_version"]:
        console.print(f"registered {cfg.name} v{result['registered_version']} as challenger")
    console.print(f"sweep {result['study']}: {result['ran']} trial(s) run in {result['wall_s']:.0f} s; "
                  f"MLflow sweep run {result['mlflow_run_id']}; Pareto plot {result['plot']}", soft_wrap=True)
