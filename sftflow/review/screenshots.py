"""`sftflow screenshots`: the Prefect flow-run page and the MLflow comparison view, rendered in headless
Chromium. Each page is checked to show what it should (flow-run name, run names) before it counts."""

from __future__ import annotations

from pathlib import Path

from sftflow import links
from sftflow.errors import UserError
from sftflow.review import browser, compare


class ShotError(UserError, RuntimeError):
    pass


def prefect_run_page(prefect_url: str, flow_run_id: str) -> str:
    return f"{prefect_url}/runs/flow-run/{flow_run_id}"


def latest_flow_run():
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    finished = FlowRunFilterStateType(any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1, flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True), state=FlowRunFilterState(type=finished)))
    if not runs:
        raise ShotError("the Prefect server has no finished flow runs yet")
    return runs[0]


def shows(url: str, texts: list[str], budget_ms: int = 20000) -> str:
    """Render `url`; raise unless every text appears in the rendered DOM. Returns the DOM."""
    dom = browser.dump_dom(url, budget_ms)
    missing = [t for t in texts if t not in dom]
    if missing:
        raise ShotError(f"{url} rendered without {missing}")
    return dom


def take(record: dict, refs: list[str], flow_run_id: str | None, out: Path) -> list[Path]:
    from mlflow.tracking import MlflowClient
    from prefect import get_client

    if flow_run_id:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
    else:
        run = latest_flow_run()
    page = prefect_run_page(record["prefect_url"], str(run.id))
    shows(page, [run.name])
    paths = [browser.screenshot(page, out / "prefect-flow-run.png")]

    client = MlflowClient()
    if refs:
        runs = compare.resolve(refs, client)
    else:
        found = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])
                 if compare.is_pipeline_run(r) and r.info.status == "FINISHED"]
        runs = sorted(found, key=lambda r: r.info.start_time)[-2:]
        if len(runs) < 2:
            raise ShotError("the comparison view needs two finished pipeline runs")
    url = links.mlflow_compare_url(sorted({r.info.experiment_id for r in runs}), [r.info.run_id for r in runs],
                                   record["mlflow_url"])
    shows(url, [r.info.run_name for r in runs])
    # Tall: below the plots the page lists the runs' params and metrics side by side.
    paths.append(browser.screenshot(url, out / "mlflow-compare.png", size=(1600, 2400)))
    return paths
