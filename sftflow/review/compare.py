"""`sftflow compare`: line up pipeline runs (MLflow parent runs) side by side.

Runs carry stable names (params = flattened config keys, metrics `heldout/delta/*`,
`forgetting/<bench>/delta`, `train/final_loss`, ...), so a comparison is a table of those names: the
config keys whose values differ, target gain, forgetting, train loss and wall time; plus a markdown and
an HTML report with plots.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sftflow import charts
from sftflow import metrics as names
from sftflow.errors import UserError
from sftflow.hooks import PRUNED_TAG


@dataclass
class RunView:
    run_id: str
    name: str
    experiment_id: str
    params: dict
    metrics: dict
    wall_s: float | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    pruned: str | None = None  # why a sweep's pruner stopped this run's training (hooks.PRUNED_TAG)


class CompareError(UserError, ValueError):
    pass


def is_pipeline_run(run) -> bool:
    """A pipeline's own run (a sweep's trials are nested under the sweep run), not one of its stages."""
    return "sftflow.stage" not in run.data.tags and "train.method" in run.data.params


def sweep_trials(ref: str, client: MlflowClient) -> list | None:
    """A sweep (its MLflow run id or study name) -> its finished and pruned trial runs (not crashed ones); None
    when ref names no sweep."""
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=1,
        filter_string=f"tags.`sftflow.sweep` = '{ref}' and attributes.run_name = '{ref}'") if "'" not in ref else []
    sweep = found[0] if found else None
    if sweep is None:
        try:
            sweep = client.get_run(ref)
        except MlflowException:
            return None
        if "sftflow.sweep" not in sweep.data.tags or is_pipeline_run(sweep):
            return None
    trials = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    return [r for r in trials if is_pipeline_run(r) and (r.info.status == "FINISHED" or PRUNED_TAG in r.data.tags)]


def resolve(refs: list[str], client: MlflowClient) -> list:
    """Each ref is a run id, a sweep (its run id or study name: its finished trials), or an experiment name/id
    standing for all its finished pipeline runs."""
    runs = []
    for ref in refs:
        if (trials := sweep_trials(ref, client)) is not None:
            runs += trials
            continue
        try:
            runs.append(client.get_run(ref))
            continue
        except MlflowException:
            pass
        exp = client.get_experiment_by_name(ref)
        if exp is None and ref.isdigit():
            try:
                exp = client.get_experiment(ref)
            except MlflowException:
                exp = None
        if exp is None:
            raise CompareError(f"{ref!r} is neither an MLflow run id nor an experiment name or id")
        found = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                               order_by=["attributes.start_time ASC"]) if is_pipeline_run(r)]
        if not found:
            raise CompareError(f"experiment {ref!r} has no finished sftflow pipeline runs")
        runs += found
    unique = list({r.info.run_id: r for r in runs}.values())
    if len(unique) < 2:
        raise CompareError("compare needs at least two runs")
    return unique


def _loss_curve(client: MlflowClient, run) -> list[tuple[int, float]]:
    children = client.search_runs([run.info.experiment_id], max_results=1,
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                "and tags.`sftflow.stage` = 'train'")
    if not children:
        return []
    return [(m.step, m.value) for m in client.get_metric_history(children[0].info.run_id, "train/loss")]


def views(refs: list[str], client: MlflowClient | None = None) -> list[RunView]:
    client = client or MlflowClient()
    out = []
    for run in resolve(refs, client):
        end = run.info.end_time
        out.append(RunView(run.info.run_id, run.info.run_name or run.info.run_id, run.info.experiment_id,
                           dict(run.data.params), dict(run.data.metrics),
                           (end - run.info.start_time) / 1000 if end else None, _loss_curve(client, run),
                           run.data.tags.get(PRUNED_TAG)))
    return out


def config_differences(runs: list[RunView]) -> dict[str, list[str | None]]:
    keys = sorted({k for r in runs for k in r.params})
    return {k: [r.params.get(k) for r in runs] for k in keys if len({r.params.get(k) for r in runs}) > 1}


def table(runs: list[RunView]) -> tuple[list[str], list[tuple[str, list]]]:
    """(column headers, rows): each row is (label, one value per run)."""
    metric_names = sorted({k for r in runs for k in r.metrics})
    rows: list[tuple[str, list]] = [(f"config {k}", v) for k, v in config_differences(runs).items()]
    if any(r.pruned for r in runs):  # a pruned trial has no evaluation: say why its cells are empty
        rows.append(("pruned", [r.pruned for r in runs]))
    gains = {k: g for k in metric_names if (g := names.parse_heldout_delta(k))}
    rows += [(f"gain {g.label}", [r.metrics.get(k) for r in runs]) for k, g in gains.items()]
    drops = {k: f for k in metric_names if (f := names.parse_forgetting(k)) and f.stat == "delta"}
    rows += [(f"forgetting {f.label}", [r.metrics.get(k) for r in runs]) for k, f in drops.items()]
    rows += [(k, [r.metrics.get(k) for r in runs]) for k in ("train/final_loss", "train/val_loss",
                                                               "train/trainable_params")]
    rows.append(("wall time (s)", [r.wall_s for r in runs]))
    return [r.name for r in runs], rows


def fmt(value, label: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.4f}" if label.startswith(("gain", "forgetting")) else f"{value:.4g}"
    return str(value)


def _plots(runs: list[RunView], rows: list[tuple[str, list]], out_dir: Path) -> list[Path]:
    paths = []
    if deltas := [(label, values) for label, values in rows if label.startswith(("gain", "forgetting"))]:
        paths.append(charts.plot_run_deltas([r.name for r in runs], deltas, out_dir / "deltas.png"))
    if curves := [(r.name, r.loss_curve) for r in runs if r.loss_curve]:
        paths.append(charts.plot_loss_curves(curves, out_dir / "train_loss.png"))
    return paths


def write_report(runs: list[RunView], out_dir: Path) -> dict[str, Path]:
    """report.md and report.html (same table and plots) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    headers, rows = table(runs)
    plots = _plots(runs, rows, out_dir)
    ids = " · ".join(f"`{r.name}` = {r.run_id}" for r in runs)
    md = [f"# sftflow comparison ({time.strftime('%Y-%m-%d %H:%M')})", "", ids, "",
          "| | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    md += [f"| {label} | " + " | ".join(fmt(v, label) for v in values) + " |" for label, values in rows]
    md += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    cell = lambda v, tag="td": f"<{tag}>{html.escape(str(v))}</{tag}>"  # noqa: E731
    body = "".join(f"<tr>{cell(label, 'th')}{''.join(cell(fmt(v, label)) for v in values)}</tr>" for label, values in rows)
    (out_dir / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>sftflow comparison</title>"
        "<style>body{font-family:sans-serif}td{text-align:right;padding:2px 10px}th{text-align:left}</style>"
        f"<h1>sftflow comparison</h1><p>{html.escape(ids)}</p>"
        f"<table><tr><th></th>{''.join(cell(h, 'th') for h in headers)}</tr>{body}</table>"
        + "".join(f"<p><img src='{p.name}' alt='{p.stem}'></p>" for p in plots))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
            **{p.stem: p for p in plots}}
