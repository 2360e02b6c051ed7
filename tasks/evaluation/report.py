"""The report stage, the summary: held-out gain and forgetting (benchmarks and their categories), base vs
fine-tuned, each delta with its 95% CI and p-value, and the promotion verdict."""

from __future__ import annotations

import json
from pathlib import Path

from sftflow import metrics as names
from sftflow.results import Report, Verdict
from sftflow.tracking import stage

HELDOUT = ("exact_match", "label_acc", "macro_f1")


def summary_rows(metrics: dict, forgetting: list[dict]) -> list[dict]:
    """One row per held-out measure and per benchmark/category row of the ft-vs-base forgetting table."""
    rows = []
    for name in HELDOUT:
        if names.heldout_delta(name) not in metrics:
            continue
        rows.append({"measure": f"held-out {name}", "base": metrics[names.heldout("base", name)],
                     "fine-tuned": metrics[names.heldout(names.FT, name)], "delta": metrics[names.heldout_delta(name)],
                     **{s: metrics.get(names.heldout_delta(name, s)) for s in names.DELTA_STATS},
                     "n": int(metrics[names.HELDOUT_RECORDS]), "flag": ""})
    for r in forgetting:
        if r["scope"] == "subtask":
            continue
        rows.append({"measure": f"{r['name']} {r['metric']}", "base": r["base"], "fine-tuned": r["ft"],
                     "delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
                     "mde": r.get("mde"), "n": r["n"], "flag": "significant drop" if r["significant_drop"] else ""})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def timing(metrics: dict) -> str:
    """Evaluation wall time per stage and model, with how much of the sweep came from the cache."""
    held, bench = names.stage_duration("heldout"), names.stage_duration("benchmarks")
    parts = [f"held-out {metrics[held]:.0f} s"] if held in metrics else []
    if bench in metrics:
        work = {}
        for k, v in metrics.items():
            if parsed := names.parse_eval_work(k):
                work.setdefault(parsed[0], {})[parsed[1]] = v
        models = [f"{t} {w['wall_s']:.0f} s, {w['cached_tasks']:.0f}/"
                  f"{w['cached_tasks'] + w['evaluated_tasks']:.0f} tasks cached" for t, w in sorted(work.items())]
        parts.append(f"benchmarks {metrics[bench]:.0f} s ({'; '.join(models)})")
    return "Evaluation wall time: " + ", ".join(parts) if parts else ""


def to_markdown(rows: list[dict], verdict: dict | None = None, footer: str = "") -> str:
    lines = ["| measure | base | fine-tuned | delta | 95% CI | p | MDE | n | |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ci = "–" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"| {r['measure']} | {r['base']:.3f} | {r['fine-tuned']:.3f} | {r['delta']:+.3f} | {ci} "
                     f"| {_fmt(r['p_value'], '.3g')} | {_fmt(r.get('mde'), '.3f')} | {r['n']} | {r['flag']} |")
    if verdict is not None:
        lines += ["", f"**Promotion gate ({verdict['model']}, {verdict['bound']}): "
                      f"{'PASSED' if verdict['passed'] else 'FAILED'}**", ""]
        lines += [f"- {'ok' if c['passed'] else 'FAIL'}: {c['reason']}" for c in verdict["checks"]]
    if footer:
        lines += ["", footer]
    return "\n".join(lines)


@stage("report")
def report(stage_metrics: list[dict], forgetting: list[dict], out_dir: Path, verdict: Verdict | None = None) -> Report:
    merged = {k: v for m in stage_metrics for k, v in m.items()}
    if verdict is not None:  # the gate stage's result also carries its MLflow bookkeeping
        verdict = {k: verdict[k] for k in ("passed", "reasons", "checks", "model", "bound")}
    rows = summary_rows(merged, forgetting)
    markdown = to_markdown(rows, verdict, timing(merged))
    (out_dir / "summary.json").write_text(json.dumps({"rows": rows, "gate": verdict, "metrics": merged}, indent=2))
    (out_dir / "summary.md").write_text("# sftflow summary\n\n" + markdown + "\n")
    return {"rows": rows, "markdown": markdown, "timing": timing(merged), "metrics": {},
            "artifacts": [out_dir / "summary.json", out_dir / "summary.md"]}
