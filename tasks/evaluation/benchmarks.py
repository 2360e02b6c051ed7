"""The benchmark stage: lm-eval sweeps on MMLU and BBH (and any stock lm-eval task), every model vs the base.

Which models are swept, their items aggregated into scores (micro-averages per benchmark, lm-eval category
and subtask), and every model other than the base compared with it (forgetting). The tasks come from
mirror.py, the per-model items from lmeval.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sftflow import metrics as names
from sftflow import precision
from sftflow.charts import plot_deltas
from sftflow.configs.schema import EvalConfig
from sftflow.records import write_jsonl
from sftflow.results import Benchmarks, ModelRef
from sftflow.tasks.evaluation.forgetting import forgetting_metrics, forgetting_rows, to_markdown
from sftflow.tasks.evaluation.lmeval import lm_eval_version, model_items
from sftflow.tasks.evaluation.mirror import sweep_tasks
from sftflow.tracking import stage


def aggregate(items: list[dict], tag: str) -> dict[str, float]:
    """Micro-averages (as lm-eval's weight_by_size groups) per benchmark, per category and per subtask."""
    groups: dict[str, list[float]] = {}
    for it in items:
        scopes = [it["benchmark"], f"{it['benchmark']}/{it['task']}"] + ([it["category"]] if it.get("category") else [])
        for scope in scopes:
            groups.setdefault(names.eval_score(tag, scope, it["metric"]), []).append(it["score"])
    metrics = {k: sum(v) / len(v) for k, v in groups.items()}
    for bench in {it["benchmark"] for it in items}:
        metrics[names.eval_count(tag, bench)] = sum(it["benchmark"] == bench for it in items)
    return metrics


def champion_metrics(rows: list[dict]) -> dict[str, float]:
    """`champion/delta/<benchmark or category>[/<stat>]` from the candidate-vs-champion rows."""
    return {names.champion_delta(r["name"], None if field == "delta" else field): r[field]
            for r in rows if r["scope"] != "subtask" for field in ("delta", *names.DELTA_STATS)}


def sweep_models(model: str, base: str, offline: bool, baseline: bool) -> dict[str, dict]:
    """`sftflow eval`'s models: the one asked for as "model" (a LoRA adapter folder sits on `base`),
    plus the base itself when comparing; compared models share the base's tokenizer and chat template."""
    from sftflow.models import model_digest, resolve

    adapter = Path(model).expanduser()
    if (adapter / "adapter_config.json").is_file():
        on = resolve(base, offline)
        spec = {"path": on.path, "adapter": str(adapter.resolve()), "tokenizer": on.path,
                "digest": model_digest(on.path, str(adapter.resolve()))}
    else:
        found = resolve(model, offline)
        spec = {"path": found.path, "digest": found.digest, "tokenizer": found.path}
    if not baseline:
        return {"model": spec}
    ref = resolve(base, offline)
    return {"base": {"path": ref.path, "digest": ref.digest, "tokenizer": ref.path},
            "model": {**spec, "tokenizer": ref.path}}


def task_list(tasks: list, items: list[dict]) -> list[dict]:
    """What the sweep ran, by content: each task's fingerprint (its prompts, items and few-shot) and item count;
    a version's history keeps it, so a later candidate can be told whether it faces the same benchmark items."""
    per_task, per_benchmark = Counter((it["benchmark"], it["task"]) for it in items), Counter(
        it["benchmark"] for it in items)
    return [{"name": t.name, "benchmark": t.benchmark, "subtask": t.subtask, "fingerprint": t.fingerprint,
             "items": per_benchmark[t.benchmark] if t.stock else per_task[(t.benchmark, t.subtask)]} for t in tasks]


@stage("benchmarks")
def benchmarks(models: dict[str, ModelRef], cfg: EvalConfig, out_dir: Path,
               trust_remote_code: bool = False) -> Benchmarks:
    """models: {"base": {"path", "digest"?}, "ft": {"path", "adapter"?}, ...}: any number, any names.

    Each model is swept over the same items; every model other than "base" is compared with "base"
    (forgetting rows with paired-bootstrap CIs and McNemar tests, a chart, markdown and JSON).
    """
    mirror = out_dir / "tasks"
    tasks = sweep_tasks(cfg, mirror)
    if not tasks:
        return {"metrics": {}, "forgetting": {}}
    metrics: dict[str, float] = {}
    items: dict[str, list[dict]] = {}
    for tag, spec in models.items():
        items[tag], info = model_items(spec, tasks, mirror, cfg, trust_remote_code)
        metrics.update({names.eval_work(tag, k): v for k, v in info.items()})
        write_jsonl(out_dir / f"items_{tag}.jsonl", items[tag])
        metrics.update(aggregate(items[tag], tag))
    (out_dir / "tasks.json").write_text(json.dumps(task_list(tasks, next(iter(items.values()), [])), indent=2))
    artifacts = [mirror, out_dir / "tasks.json", *(out_dir / f"items_{t}.jsonl" for t in items)]
    rows = {}
    if "base" in items:
        for tag in (t for t in items if t != "base"):  # the champion too: base / champion / candidate
            rows[tag] = forgetting_rows(items["base"], items[tag], cfg.bootstrap_iters, cfg.alpha, cfg.seed)
            metrics.update(forgetting_metrics(rows[tag], tag))
            (out_dir / f"forgetting_{tag}.md").write_text(to_markdown(rows[tag], tag, cfg.alpha) + "\n")
            artifacts += [out_dir / f"forgetting_{tag}.md",
                          *plot_deltas(rows[tag], out_dir / f"forgetting_{tag}.png", f"{tag} minus base (95% CI)")]
        if names.CHAMPION in items and names.FT in items:  # the candidate against the model in service
            rows["ft_vs_champion"] = forgetting_rows(items[names.CHAMPION], items[names.FT], cfg.bootstrap_iters,
                                                     cfg.alpha, cfg.seed)
            metrics.update(champion_metrics(rows["ft_vs_champion"]))
            (out_dir / "forgetting_vs_champion.md").write_text(
                to_markdown(rows["ft_vs_champion"], "ft", cfg.alpha).replace("ft minus base", "ft minus champion")
                .replace("| base |", "| champion |") + "\n")
            artifacts.append(out_dir / "forgetting_vs_champion.md")
        (out_dir / "forgetting.json").write_text(json.dumps(rows, indent=2))
        artifacts.append(out_dir / "forgetting.json")
    (out_dir / "benchmarks.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "forgetting": rows, "artifacts": [out_dir / "benchmarks.json", *artifacts],
            "params": {"eval.benchmarks": ",".join(sorted({t.benchmark for t in tasks})),
                       "eval.lm_eval_version": lm_eval_version(), **precision.eval_params()}}
