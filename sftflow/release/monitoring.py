"""Monitoring the champion: score it on fresh labelled traffic with the held-out metrics, against its own
held-out score, and say whether it dropped by more than the configured margin.

The version's held-out score is a share of 0/1 scores over `heldout/records` items, so its per-item scores
are known up to order; the 95% CI of (new - held-out) is an unpaired bootstrap over both samples. A drop
counts when the point drop exceeds `monitor.margin` and the whole CI lies below zero.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sftflow import stats
from sftflow.configs.schema import PipelineConfig
from sftflow.errors import UserError
from sftflow.release import registry
from sftflow.records import prompt_messages, reference, write_jsonl

MONITOR_TAG = "sftflow.monitor"


class MonitorError(UserError, RuntimeError):
    pass


def read_traffic(path: Path, max_error_share: float) -> tuple[list[dict], list[dict]]:
    """Labelled records in any format the load stage reads -> (records, rejects with file:line and reason);
    stops when more than max_error_share of the lines are bad, listing them."""
    from sftflow.tasks.data.load import BadRow, normalise
    from sftflow.tasks.data.readers import Bad, read_rows

    if not path.is_file():
        raise MonitorError(f"monitor data not found: {path}")
    records, rejects = [], []
    for n, row in read_rows(path):  # one unreadable line (invalid JSON, not UTF-8, oversize) costs that line
        try:
            if isinstance(row, Bad):
                raise BadRow(row.reason)
            messages, label, _ = normalise(row)
            if label is None and messages[-1]["role"] != "assistant":
                raise BadRow("no reference: neither a label nor a final assistant turn")
            records.append({"id": f"{path.name}:{n}", "messages": messages, "label": label})
        except BadRow as exc:
            rejects.append({"where": f"{path}:{n}", "reason": str(exc)})
    total = len(records) + len(rejects)
    if not records or len(rejects) > max_error_share * total:
        shown = "\n  ".join(f"{r['where']}: {r['reason']}" for r in rejects[:20])
        raise MonitorError(f"{path}: {len(rejects)} of {total} records are unusable (limit "
                           f"{max_error_share:.0%}):\n  {shown}")
    return records, rejects


def version_score(version, metric: str) -> tuple[float, int, str]:
    """(held-out score, items, pipeline run id) the version was registered with."""
    from mlflow.tracking import MlflowClient

    run_id = version.tags.get("mlflow.parent_run_id", "")
    metrics = MlflowClient().get_run(run_id).data.metrics if run_id else {}
    key = f"heldout/ft/{metric}"
    if key not in metrics or not metrics.get("heldout/records"):
        raise MonitorError(f"v{version.version} has no held-out {metric} to compare with (run {run_id or '?'})")
    return metrics[key], int(metrics["heldout/records"]), run_id


def judge(score: float, reference_score: float, reference_n: int, scores: list[float], margin: float,
          iters: int = 2000, seed: int = 0) -> dict:
    ones = round(reference_score * reference_n)
    ref = np.array([1.0] * ones + [0.0] * (reference_n - ones))
    low, high = stats.unpaired_delta_ci(ref, np.asarray(scores, dtype=float), iters, seed)
    delta = score - reference_score
    dropped = delta < -margin and high < 0
    reason = (f"score {score:.4f} vs held-out {reference_score:.4f}: delta {delta:+.4f} "
              f"(95% CI {low:+.4f} .. {high:+.4f}); {'drop beyond' if dropped else 'within'} margin {margin:.4f}")
    return {"delta": delta, "ci_low": low, "ci_high": high, "dropped": dropped, "reason": reason}


def check(cfg: PipelineConfig, data: Path, out_dir: Path) -> dict:
    """Score the champion of cfg.name on `data`; log the check as an MLflow run (and on the champion's
    LoggedModel, so its metric history shows every check) -> the verdict."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from sftflow.tasks.evaluation.heldout import correct, generate
    from sftflow.tasks.training.template import with_system
    from sftflow.tracking import ensure_experiment, finite_metrics

    champion = registry.champion(cfg.name)
    if champion is None:
        raise MonitorError(f"{cfg.name}: no champion to monitor; register and promote a candidate first")
    metric = cfg.monitor.metric
    reference_score, reference_n, pipeline_run = version_score(champion, metric)
    records, rejects = read_traffic(data, cfg.curate.preflight.max_error_share)
    parts = mlflow.transformers.load_model(f"models:/{cfg.name}@champion", return_type="components")
    prompts = [with_system(prompt_messages(r), cfg.template.system_prompt) for r in records]
    predictions = generate(parts["model"].eval(), parts["tokenizer"], prompts, cfg.eval.heldout.max_new_tokens,
                           cfg.eval.heldout.batch_size)
    scores = correct(predictions, [reference(r) for r in records])[metric]
    score = float(np.mean(scores))
    verdict = judge(score, reference_score, reference_n, scores, cfg.monitor.margin, cfg.eval.bootstrap_iters,
                    cfg.eval.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", [{"id": r["id"], "reference": reference(r), "prediction": p,
                                                 metric: s} for r, p, s in zip(records, predictions, scores)])
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    metrics = finite_metrics({f"monitor/{metric}": score, f"monitor/heldout_{metric}": reference_score,
                              f"monitor/delta/{metric}": verdict["delta"], f"monitor/delta/{metric}/ci_low":
                              verdict["ci_low"], f"monitor/delta/{metric}/ci_high": verdict["ci_high"],
                              "monitor/records": len(records), "monitor/rejected": len(rejects),
                              "monitor/dropped": float(verdict["dropped"])})
    client = MlflowClient()
    model_id = champion.source.removeprefix("models:/") if champion.source.startswith("models:/") else None
    experiment = ensure_experiment(cfg.tracking.experiment, None)
    step = len(client.search_runs([experiment], filter_string=f"tags.`{MONITOR_TAG}` = '{cfg.name}'"))
    with mlflow.start_run(experiment_id=experiment, run_name=f"monitor-{cfg.name}-v{champion.version}",
                          tags={MONITOR_TAG: cfg.name, "sftflow.model_version": str(champion.version),
                                "sftflow.pipeline_run_id": pipeline_run, "sftflow.monitor.data": str(data)}) as run:
        mlflow.log_params({"monitor.metric": metric, "monitor.margin": cfg.monitor.margin, "monitor.data": str(data)})
        # linked to the champion's LoggedModel too: its metric history shows every check, one step each
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, v, now, step, model_id=model_id)
                                                   for k, v in metrics.items()])
        mlflow.log_artifact(str(out_dir / "predictions.jsonl"))
        mlflow.log_artifact(str(out_dir / "rejects.jsonl"))
        mlflow.set_tag("sftflow.monitor.verdict", "dropped" if verdict["dropped"] else "ok")
    return {**verdict, "score": score, "reference": reference_score, "metric": metric, "records": len(records),
            "rejected": len(rejects), "version": str(champion.version), "mlflow_run_id": run.info.run_id}
