"""MLflow run tree (one parent per flow run, one child per stage) and the `@stage` declaration.

Stage functions stay plain: `fn(..., out_dir=Path) -> {"metrics": {...}, "artifacts": [...], ...}`.
`@stage(name)` gives one a `.task`: the Prefect task that runs it inside its own child MLflow run.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sftflow import env, errors, hooks
from sftflow.links import prefect_flow_run_url
from sftflow.metrics import stage_duration
from sftflow.redact import redact


class RunContext(BaseModel):
    """What every stage needs to find its folder and its parent MLflow run."""

    run_dir: str
    parent_run_id: str
    experiment_id: str

    def stage_dir(self, name: str) -> Path:
        path = Path(self.run_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# MLflow 3's UI opens an experiment with this tag in its model-training view (not the GenAI evaluation view).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(name: str, artifact_root: Path | None) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow.create_experiment(name, tags=dict([EXPERIMENT_KIND]), artifact_location=(
                artifact_root / name).as_uri() if artifact_root else None)
        except mlflow.exceptions.MlflowException:  # another run created it between the lookup and the insert
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # created before sftflow tagged its experiments
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def unique_race_retry(fn: Callable, attempts: int = 5):
    """MLflow's SQL store checks then inserts (datasets, inputs): two runs logging the same row at once make
    one fail on the UNIQUE constraint; on the next try the row exists and is reused."""
    import mlflow

    for attempt in range(attempts):
        try:
            return fn()
        except mlflow.exceptions.MlflowException as e:
            if "UNIQUE constraint" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def host() -> str:
    """This machine and PID namespace: pids compare only within one (containers sharing a hostname have their own)."""
    try:
        return f"{socket.gethostname()}/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS)
        return socket.gethostname()


def process_tags() -> dict[str, str]:
    """Which process owns a run: lets a later run tell a live run from one whose process was killed."""
    return {"sftflow.host": host(), "sftflow.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def owner_gone(tags: dict) -> bool:
    """Whether the process named by `process_tags()` ran on this host and is gone (other hosts: unknown, False)."""
    return tags.get("sftflow.host") == host() and not _alive(int(tags.get("sftflow.pid", os.getpid())))


def close_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs opened on this host by a process that is gone; -> their run ids.

    An exception ends a run as FAILED, but SIGKILL, the OOM killer or a lost machine end nothing, and the run
    would show as running forever in the MLflow UI. Runs of other hosts (or PID namespaces) are left alone: their
    pids mean nothing here. A reused pid can make a dead run look alive, never a live one dead.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    orphans = [r.info.run_id for r in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`sftflow.host` = '{host()}'")
        if owner_gone(r.data.tags)]
    for run_id in orphans:
        client.set_terminated(run_id, "KILLED")
    return orphans


class TrackingUnreachable(errors.UserError, ConnectionError):
    """The MLflow tracking server does not answer: nothing can be recorded, so the run stops at once."""


def _unreachable(uri: str, timeout: float) -> str | None:
    """Why an HTTP tracking server does not answer, or None (any HTTP response means it is up)."""
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_reachable(timeout: float = 5.0) -> None:
    """Fail before any work when the tracking server is down (local SQLite/file stores need no check)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")) and (why := _unreachable(uri, timeout)):
        raise TrackingUnreachable(f"MLflow tracking server {uri} is unreachable ({why}); start it (`sftflow up`) "
                                  "or point MLFLOW_TRACKING_URI at a running one, then rerun")


@contextlib.contextmanager
def tracking_errors(timeout: float = 5.0) -> Iterator[None]:
    """An MLflow call that failed because the server went away -> one TrackingUnreachable naming the URI,
    instead of MLflow's chained retry errors. Runs left RUNNING are closed as KILLED by the next run."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except TrackingUnreachable:
        raise
    except (MlflowException, RequestException, ConnectionError):
        import mlflow

        uri = mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")) and (why := _unreachable(uri, timeout)):
            raise TrackingUnreachable(
                f"MLflow tracking server {uri} stopped answering ({why}) during the run; start it again and "
                "rerun: finished stages come from the cache, and this run's MLflow runs are closed as KILLED "
                "by the next run") from None
        raise


def finite_metrics(metrics: dict) -> dict[str, float]:
    """MLflow rejects None; NaN/inf are kept out too so the compare view stays readable."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def log_artifacts(paths: list[str | Path]) -> None:
    import mlflow

    for p in map(Path, paths):
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=p.name)
        elif p.exists():
            mlflow.log_artifact(str(p))


def run_stage(name: str, fn: Callable, ctx: RunContext, *args, **kwargs) -> dict:
    """Run `fn` in a child MLflow run of ctx.parent_run_id; log its metrics, artifacts and duration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    out_dir = ctx.stage_dir(name)
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=name, parent_run_id=ctx.parent_run_id,
                          nested=True, tags={"sftflow.stage": name, **process_tags()}) as run, \
            hooks.pruned_run_ends_killed():
        start = time.perf_counter()
        result = fn(*args, out_dir=out_dir, **kwargs) or {}
        duration = time.perf_counter() - start
        metrics = finite_metrics({**result.get("metrics", {}), stage_duration(name): duration})
        if result.get("params"):
            mlflow.log_params({k: str(v)[:6000] for k, v in redact(result["params"]).items()})
        mlflow.log_metrics(metrics)
        log_artifacts(result.get("artifacts", []))
        result["mlflow_run_id"] = run.info.run_id
    # Summary metrics also on the parent, so runs compare at the top level.
    MlflowClient().log_batch(ctx.parent_run_id, metrics=[
        mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()])
    result["metrics"] = metrics
    log_summary(name, metrics, duration, result.get("params") or {})
    return result


STAGE_LOGGER = "sftflow.stages"


def log_summary(name: str, metrics: dict, duration: float, params: dict | None = None) -> None:
    """One INFO line with the stage's key figures: in a Prefect task on its run logger (the Prefect UI shows it),
    else on `sftflow.stages`. The record carries the parts (`sftflow_stage`) for the terminal's progress line."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    from sftflow.stage_summary import cache_hit, stage_summary

    hit, summary = cache_hit(name, metrics), stage_summary(name, metrics, params)
    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger(STAGE_LOGGER)
    logger.info("%s: %s%.1f s%s", name, "cache hit, " if hit else "", duration, f"; {summary}" if summary else "",
                extra={"sftflow_stage": {"stage": name, "cache_hit": hit, "duration_s": duration, "summary": summary}})


def stage(name: str, **task_kwargs) -> Callable[[Callable], Callable]:
    """Declare a stage: the function is returned as is, with `.task(ctx, *args)`, the Prefect task running
    run_stage(name, fn, ctx, *args). Stages pass paths, not data: no result persistence; caching is per stage."""
    def declare(fn: Callable) -> Callable:
        def wrapper(ctx: RunContext, *args, **kwargs):
            with tracking_errors():
                return run_stage(name, fn, ctx, *args, **kwargs)

        # Not functools.wraps: Prefect would read fn's signature (no ctx) through __wrapped__.
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        fn.stage, fn.task = name, task(wrapper, name=name, **{"cache_policy": NO_CACHE, **task_kwargs})
        return fn
    return declare


def _artifact_root(state: Path) -> Path | None:
    """Local tracking stores keep artifacts in the state dir; a tracking server decides for itself."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return state / "mlartifacts" if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None


def open_experiment(cfg, state: Path) -> str:
    """The config's MLflow experiment id, created if new; fails first when the tracking server is down."""
    check_reachable()
    env.init_tracking_store()
    return ensure_experiment(cfg.tracking.experiment, _artifact_root(state))


@contextlib.contextmanager
def parent_run(cfg, state: Path, flow_run_id: str, flow_run_name: str,
               nest_under: str | None = None) -> Iterator[RunContext]:
    """Open the flow's run directory and parent MLflow run (params = flattened resolved config, secrets masked);
    with `nest_under` (a sweep's MLflow run id) that run is nested under it.

    A user error raised inside names this run's folder, where the CLI writes its traceback (error.log)."""
    import mlflow
    import yaml

    from sftflow.configs.loader import flatten

    run_dir = state / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run_name}"
    exp_id = open_experiment(cfg, state)
    run_dir.mkdir(parents=True, exist_ok=False)  # a run never writes into another run's folder
    if orphans := close_orphans(exp_id):
        print(f"marked {len(orphans)} MLflow run(s) of killed processes KILLED: {', '.join(orphans)}")
    tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name,
            "sftflow.config_hash": cfg.digest(), "sftflow.run_dir": str(run_dir), **process_tags()}
    if url := prefect_flow_run_url(flow_run_id):  # only with a Prefect server whose UI outlives the run
        tags["prefect.flow_run_url"] = url
    with tracking_errors(), mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.name}-{flow_run_name}",
                                             tags=redact(tags), parent_run_id=nest_under,
                                             nested=nest_under is not None) as run:
        mlflow.log_params(flatten(cfg))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        try:
            with hooks.pruned_run_ends_killed():
                yield RunContext(run_dir=str(run_dir), parent_run_id=run.info.run_id, experiment_id=exp_id)
        except errors.UserError as exc:
            errors.attach_run_dir(exc, run_dir)
            raise
