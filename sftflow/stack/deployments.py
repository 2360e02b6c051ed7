"""`sftflow deploy`: create or update the Prefect deployments defined in deployments/deployments.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

from sftflow.errors import UserError
from sftflow.stack.fence import Fence

DEFINITIONS = Path("deployments/deployments.yaml")


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: Literal["sftflow-retrain", "sftflow-monitor", "sftflow-sweep"] = "sftflow-retrain"
    description: str = ""
    parameters: dict = {}
    tags: list[str] = []
    cron: str | None = None
    timezone: str = "UTC"
    concurrency_limit: int | None = None
    job_variables: dict = {}
    # What runs started from this deployment's form may do; written into the deployment's tags on apply.
    allow: Fence = Fence()


def load_specs(path: Path = DEFINITIONS) -> dict[str, DeploymentSpec]:
    if not path.is_file():
        raise UserError(f"deployment definitions not found: {path} (run from the project directory)")
    return {name: DeploymentSpec.model_validate(spec) for name, spec in (yaml.safe_load(path.read_text()) or {}).items()}


def allowed(spec: DeploymentSpec, config_file: str | None) -> Fence:
    """The deployment's fence; a default config chosen with `sftflow deploy --config` is the operator's choice,
    so its folder is readable too."""
    extra = [str(Path(config_file).expanduser().resolve().parent)] if config_file else []
    return spec.allow.model_copy(update={"roots": [*spec.allow.roots, *extra]})


def apply(specs: dict[str, DeploymentSpec], flows: dict, pool: str, config_file: str | None = None,
          cron: str | None = None, image: str | None = None) -> dict[str, str]:
    """Create/update each deployment on `pool`; returns {"flow/deployment": id}.

    flows maps a spec's `flow` name to the flow object; the caller passes them, because the flows sit above
    this package. config_file replaces every deployment's default config; cron replaces every schedule; image is
    for container pools (Kubernetes), whose pods must have sftflow installed.
    """
    from prefect import deploy, get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    with get_client(sync_client=True) as client:
        pool_type = client.read_work_pool(pool).type
    # A process worker runs flows in the project directory, so relative configs and data paths resolve.
    job_variables = {"working_dir": str(Path.cwd())} if pool_type == "process" else {}
    deployments = []
    for name, spec in specs.items():
        parameters = {**spec.parameters, **({"config_file": config_file} if config_file else {})}
        schedule = cron or spec.cron
        limit = (ConcurrencyLimitConfig(limit=spec.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
                 if spec.concurrency_limit else None)
        deployments.append(flows[spec.flow].to_deployment(
            name, description=spec.description, parameters=parameters,
            tags=[*spec.tags, *allowed(spec, config_file).to_tags()],
            schedules=[CronSchedule(cron=schedule, timezone=spec.timezone)] if spec.cron else None,
            concurrency_limit=limit, job_variables={**job_variables, **spec.job_variables},
            entrypoint_type=EntrypointType.MODULE_PATH))
    ids = deploy(*deployments, work_pool_name=pool, image=image, build=False, push=False,
                 print_next_steps_message=False, ignore_warnings=True)
    return {f"{d.flow_name}/{d.name}": str(i) for d, i in zip(deployments, ids)}
