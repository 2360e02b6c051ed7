"""How every flow starts: the deployment's fence (when a deployment started the run), then the environment, then
the parent MLflow run. One object per flow run, so each flow checks the same things in the same order."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sftflow import env
from sftflow.stack.fence import Fence, config_file_violations, deployment_fence, refuse, violations
from sftflow.tracking import RunContext, parent_run


class FlowEntry:
    """Made at the top of a flow: reads once whether a deployment started this run, and with what fence."""

    def __init__(self) -> None:
        self.deployment: tuple[str, Fence] | None = deployment_fence()

    def check_files(self, *paths: Path, shipped: Path | None = None) -> None:
        """Before they are read: files a form named must lie inside the fence's roots (or the shipped configs)."""
        if self.deployment:
            name, fence = self.deployment
            refuse(name, [v for p in paths for v in config_file_violations(p, fence, shipped)])

    def check(self, cfg) -> None:
        """A resolved config (the form's overrides applied) asks for nothing the deployment does not allow."""
        if self.deployment:
            refuse(self.deployment[0], violations(cfg, self.deployment[1]))

    def admit(self, cfg) -> Path:
        """The fence on `cfg`, then the environment (state dir, offline mode) -> the state dir."""
        self.check(cfg)
        return env.configure(cfg.offline)

    @contextlib.contextmanager
    def parent_run(self, cfg, state: Path, nest_under: str | None = None) -> Iterator[RunContext]:
        """This flow run's parent MLflow run (named after the Prefect flow run)."""
        from prefect.runtime import flow_run

        with parent_run(cfg, state, str(flow_run.id), flow_run.name, nest_under) as ctx:
            yield ctx
