"""The operations commands of `sftflow`: servers (up, down, status), deployments, the model registry
(promote, rollback), run comparison and screenshots. Registered on the app in app.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from sftflow import errors
from sftflow.cli.terminal import console

ops = typer.Typer()

PortOpt = Annotated[int, typer.Option(help="0: pick a free port")]


def _connect() -> dict | None:
    """Use the servers `sftflow up` started, if they run; then the state dir and offline mode."""
    from sftflow import env
    from sftflow.stack import servers

    record = servers.use()
    env.configure(offline=True)
    return record


@ops.command()
def up(prefect_port: PortOpt = 0, mlflow_port: PortOpt = 0,
       pool: Annotated[str, typer.Option(help="Prefect process work pool the worker serves")] = "sftflow",
       backend_store_uri: Annotated[Optional[str], typer.Option(
           help="MLflow backend store (default: SQLite in the state dir), e.g. postgresql://...")] = None,
       artifact_root: Annotated[Optional[str], typer.Option(
           help="MLflow artifact root (default: <state>/mlartifacts), e.g. s3://bucket/path")] = None) -> None:
    """Start a Prefect server, an MLflow tracking server and a Prefect worker (127.0.0.1); wait until healthy."""
    from sftflow.stack import servers

    record = servers.up(prefect_port, mlflow_port, pool, backend_store_uri, artifact_root)
    _print_status(record)
    console.print(f"Prefect UI {record['prefect_url']}   MLflow UI {record['mlflow_url']}\n"
                  f"other tools: export PREFECT_API_URL={record['api_url']} MLFLOW_TRACKING_URI={record['mlflow_url']}")


def _print_status(record: dict | None) -> None:
    if record is None:
        console.print("no servers started by `sftflow up` (state: nothing recorded)")
        return
    table = Table(title=f"sftflow servers (logs in {Path(record['services']['prefect']['log']).parent})")
    for col in ("service", "pid", "running", "healthy", "url"):
        table.add_column(col)
    urls = {"prefect": record["prefect_url"], "mlflow": record["mlflow_url"], "worker": f"pool {record['pool']}"}
    for name, entry in record["services"].items():
        table.add_row(name, str(entry["pid"]), "yes" if entry["running"] else "[red]no[/red]",
                      "yes" if entry["healthy"] else "[red]no[/red]", urls[name])
    console.print(table)


@ops.command()
def down() -> None:
    """Stop exactly what `sftflow up` started (with its child processes)."""
    from sftflow.stack import servers

    stopped = servers.down()
    console.print(f"stopped {len(stopped)} processes" if stopped else "nothing to stop")


@ops.command()
def status() -> None:
    """Show what `sftflow up` started, whether each process runs and answers."""
    from sftflow.stack import servers

    record = servers.status()
    _print_status(record)
    if record and not all(e["healthy"] for e in record["services"].values()):
        raise typer.Exit(1)


def deployable_flows() -> dict:
    """The flows a deployment definition may name, by flow name."""
    from sftflow.flows.monitor import monitor
    from sftflow.flows.retrain import retrain
    from sftflow.flows.sweep import sweep

    return {f.name: f for f in (retrain, monitor, sweep)}


@ops.command()
def deploy(file: Annotated[Path, typer.Option(help="deployment definitions")] = Path("deployments/deployments.yaml"),
           pool: Annotated[Optional[str], typer.Option(help="work pool (default: the one `up` started)")] = None,
           config: Annotated[Optional[str], typer.Option(help="default config file of every deployment")] = None,
           cron: Annotated[Optional[str], typer.Option(help="replace the scheduled deployments' cron")] = None,
           image: Annotated[Optional[str], typer.Option(help="container image (Kubernetes pools)")] = None) -> None:
    """Create or update the Prefect deployments (ad-hoc and nightly retraining, monitoring, sweep) on the running
    server."""
    record = _connect()
    from sftflow.stack.deployments import apply, load_specs

    if record is None and pool is None:
        raise errors.UserError("no servers running: `sftflow up` first, or set PREFECT_API_URL and --pool")
    for name, dep_id in apply(load_specs(file), deployable_flows(), pool or record["pool"], config, cron,
                              image).items():
        console.print(f"deployment {name}: {dep_id}")
    if record:
        console.print(f"Prefect UI: {record['prefect_url']}/deployments")


ModelName = Annotated[str, typer.Argument(help="registered model = pipeline config name, e.g. demo")]


def _print_version(v, what: str) -> None:
    console.print(f"{v.name}: champion is now v{v.version} ({what}); gate.passed={v.tags.get('gate.passed')}, "
                  f"run {v.run_id}")


@ops.command()
def promote(name: ModelName,
            version: Annotated[Optional[str], typer.Argument(help="version (default: the challenger)")] = None) -> None:
    """Point the `champion` alias at a version (a human override of the promotion gate)."""
    _connect()
    from sftflow.release import registry

    _print_version(registry.promote(name, version), "promoted")


@ops.command()
def rollback(name: ModelName) -> None:
    """Move `champion` back to the version it replaced."""
    _connect()
    from sftflow.release import registry

    _print_version(registry.rollback(name), "rolled back")


@ops.command()
def serve(name: ModelName, alias: Annotated[str, typer.Option(help="registry alias to serve")] = "champion",
          port: PortOpt = 0) -> None:
    """Serve a registered version with `mlflow models serve` on 127.0.0.1 until Ctrl-C: OpenAI-style chat
    requests at /invocations."""
    _connect()
    import contextlib
    import time

    from sftflow import env
    from sftflow.release import serving

    log = env.state_dir() / "servers" / f"serve-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    uri = serving.model_uri(name, alias)
    # Ctrl-C while starting stops as cleanly as once serving: served() ends the server either way.
    with contextlib.suppress(KeyboardInterrupt), serving.served(uri, log, port or None) as url:
        console.print(f"serving {uri} at {url}/invocations (log: {log}); Ctrl-C stops it")
        while True:
            time.sleep(3600)


RefsArg = Annotated[list[str], typer.Argument(help="MLflow run ids, sweeps (run id or name: their trials) and/or "
                                                   "experiment names (all their runs)")]


@ops.command()
def compare(refs: RefsArg,
            out: Annotated[Optional[Path], typer.Option(help="report folder (default <state>/reports/compare-<time>)")] = None
            ) -> None:
    """Compare pipeline runs: config differences, target gain, forgetting, train loss, wall time; writes a report."""
    import time

    from sftflow import env
    from sftflow.review import compare as cmp

    _connect()
    runs = cmp.views(refs)
    headers, rows = cmp.table(runs)
    table = Table(title="sftflow compare")
    table.add_column("")
    for h in headers:
        table.add_column(h, justify="right")
    for label, values in rows:
        table.add_row(label, *(cmp.fmt(v, label) for v in values))
    console.print(table)
    paths = cmp.write_report(runs, out or env.state_dir() / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(f"report: {paths['markdown']} and {paths['html']}")


@ops.command()
def screenshots(refs: Annotated[Optional[list[str]], typer.Argument(
                    help="MLflow runs/experiments for the comparison view (default: the two latest runs)")] = None,
                flow_run: Annotated[Optional[str], typer.Option(help="Prefect flow run id (default: latest)")] = None,
                out: Annotated[Path, typer.Option(help="folder for the PNGs")] = Path("screenshots")) -> None:
    """Screenshot the Prefect flow-run page and the MLflow comparison view (needs `sftflow up`, chromium)."""
    record = _connect()
    if record is None:
        raise errors.UserError("no servers running: `sftflow up` first")
    from sftflow.review.screenshots import take

    for path in take(record, refs or [], flow_run, out):
        console.print(f"wrote {path}")
