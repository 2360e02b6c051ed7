"""Stage 8: the summary: held-out gain and forgetting (benchmarks and their categories), base vs
fine-tuned, each delta with its 95% CI and p-value, and the promotion verdict."""

from __future__ import annotations

import json
from pathlib import Path

from sftflow.tracking import stage_task

HELDOUT = ("exact_match", "label_acc", "macro_f1")


def summary_rows(metrics: dict, forgetting: list[dict]) -> list[dict]:
    """One row per held-out measure and per benchmark/category row of the ft-vs-base forgetting table."""
    rows = []
    for name in HELDOUT:
        if f"heldout/delta/{name}" not in metrics:
            continue
        rows.append({"measure": f"held-out {name}", "base": metrics[f"heldout/base/{name}"],
                     "fine-tuned": metrics[f"heldout/ft/{name}"], "delta": metrics[f"heldout/delta/{name}"],
                     "ci_low": metrics.get(f"heldout/delta/{name}/ci_low"),
                     "ci_high": metrics.get(f"heldout/delta/{name}/ci_high"),
                     "p_value": metrics.get(f"heldout/delta/{name}/p_value"), "n": int(metrics["heldout/records"]),
                     "flag": ""})
    for r in forgetting:
        if r["scope"] == "subtask":
            continue
        rows.append({"measure": f"{r['name']} {r['metric']}", "base": r["base"], "fine-tuned": r["ft"],
                     "delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
                     "n": r["n"], "flag": "significant drop" if r["significant_drop"] else ""})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def timing(metrics: dict) -> str:
    """Evaluation wall time per stage and model, with how much of the sweep came from the cache."""
    parts = [f"held-out {metrics['heldout/duration_s']:.0f} s"] if "heldout/duration_s" in metrics else []
    if "benchmarks/duration_s" in metrics:
        tags = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/cached_tasks")})
        models = [f"{t} {metrics[f'eval/{t}/wall_s']:.0f} s, {metrics[f'eval/{t}/cached_tasks']:.0f}/"
                  f"{metrics[f'eval/{t}/cached_tasks'] + metrics[f'eval/{t}/evaluated_tasks']:.0f} tasks cached"
                  for t in tags]
        parts.append(f"benchmarks {metrics['benchmarks/duration_s']:.0f} s ({'; '.join(models)})")
    return "Evaluation wall time: " + ", ".join(parts) if parts else ""


def to_markdown(rows: list[dict], verdict: dict | None = None, footer: str = "") -> str:
    lines = ["| measure | base | fine-tuned | delta | 95% CI | p | n | |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        ci = "–" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"| {r['measure']} | {r['base']:.3f} | {r['fine-tuned']:.3f} | {r['delta']:+.3f} | {ci} "
                     f"| {_fmt(r['p_value'], '.3g')} | {r['n']} | {r['flag']} |")
    if verdict is not None:
        lines += ["", f"**Promotion gate ({verdict['model']}, {verdict['bound']}): "
                      f"{'PASSED' if verdict['passed'] else 'FAILED'}**", ""]
        lines += [f"- {'ok' if c['passed'] else 'FAIL'}: {c['reason']}" for c in verdict["checks"]]
    if footer:
        lines += ["", footer]
    return "\n".join(lines)


def report(stage_metrics: list[dict], forgetting: list[dict], out_dir: Path, verdict: dict | None = None) -> dict:
    merged = {k: v for m in stage_metrics for k, v in m.items()}
    if verdict is not None:  # the gate stage's result also carries its MLflow bookkeeping
        verdict = {k: verdict[k] for k in ("passed", "reasons", "checks", "model", "bound")}
    rows = summary_rows(merged, forgetting)
    markdown = to_markdown(rows, verdict, timing(merged))
    (out_dir / "summary.json").write_text(json.dumps({"rows": rows, "gate": verdict, "metrics": merged}, indent=2))
    (out_dir / "summary.md").write_text("# sftflow summary\n\n" + markdown + "\n")
    return {"rows": rows, "markdown": markdown, "timing": timing(merged), "metrics": {},
            "artifacts": [out_dir / "summary.json", out_dir / "summary.md"]}


report_task = stage_task(report, "report")
