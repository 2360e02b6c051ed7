"""URLs that cross-link the two UIs: Prefect flow run <-> MLflow run."""

from __future__ import annotations


def mlflow_ui(tracking_uri: str | None = None) -> str | None:
    """Base URL of the MLflow UI when tracking goes to a server; None for a local SQLite/file store."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def mlflow_run_url(experiment_id: str, run_id: str, tracking_uri: str | None = None) -> str | None:
    base = mlflow_ui(tracking_uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base else None


def mlflow_compare_url(experiment_ids: list[str], run_ids: list[str], tracking_uri: str | None = None) -> str | None:
    import json
    from urllib.parse import quote

    base = mlflow_ui(tracking_uri)
    if not base:
        return None
    runs, exps = quote(json.dumps(run_ids, separators=(",", ":"))), quote(json.dumps(experiment_ids, separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def prefect_flow_run_url(flow_run_id: str | None = None) -> str | None:
    """UI page of a flow run (default: the current one) when Prefect talks to a server with a UI."""
    import os

    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    flow_run_id = flow_run_id or flow_run.id
    # Without PREFECT_API_URL the server is ephemeral: it has no UI that outlives the run.
    if not flow_run_id or not os.environ.get("PREFECT_API_URL") or not PREFECT_UI_URL.value():
        return None
    return f"{PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id}"
