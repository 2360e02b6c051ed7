"""Stage 7: the summary: base vs fine-tuned on the held-out split and each benchmark, with deltas."""

from __future__ import annotations

import json
from pathlib import Path

from sftflow.tasks.benchmarks import BENCHMARKS
from sftflow.tracking import stage_task


def summary_rows(metrics: dict) -> list[dict]:
    rows = []
    if "heldout/base/exact_match" in metrics:
        for name in ("exact_match", "label_acc"):
            rows.append({"measure": f"held-out {name}", "base": metrics[f"heldout/base/{name}"],
                         "fine-tuned": metrics[f"heldout/ft/{name}"], "delta": metrics[f"heldout/delta/{name}"],
                         "n": int(metrics["heldout/records"])})
    for bench, spec in BENCHMARKS.items():
        key = f"eval/base/{bench}/{spec.metric}"
        if key in metrics:
            rows.append({"measure": f"{bench} {spec.metric}", "base": metrics[key],
                         "fine-tuned": metrics[f"eval/ft/{bench}/{spec.metric}"],
                         "delta": metrics[f"forgetting/{bench}/delta"], "n": int(metrics[f"eval/base/{bench}/n"])})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| measure | base | fine-tuned | delta | n |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['measure']} | {r['base']:.3f} | {r['fine-tuned']:.3f} | {r['delta']:+.3f} | {r['n']} |" for r in rows]
    return "\n".join(lines)


def report(stage_metrics: list[dict], out_dir: Path) -> dict:
    merged = {k: v for m in stage_metrics for k, v in m.items()}
    rows = summary_rows(merged)
    (out_dir / "summary.json").write_text(json.dumps({"rows": rows, "metrics": merged}, indent=2))
    (out_dir / "summary.md").write_text("# sftflow summary\n\n" + to_markdown(rows) + "\n")
    return {"rows": rows, "markdown": to_markdown(rows), "metrics": {},
            "artifacts": [out_dir / "summary.json", out_dir / "summary.md"]}


report_task = stage_task(report, "report")
