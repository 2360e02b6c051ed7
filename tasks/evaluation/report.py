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
    return [{**row, **_vs_champion(metrics, key)} for row, key in zip(rows, _keys(metrics, forgetting))]


def _keys(metrics: dict, forgetting: list[dict]) -> list[tuple[str, str]]:
    """(champion score name, champion-delta measure) per summary row, in summary_rows' order."""
    held = [(names.heldout(names.CHAMPION, n), n) for n in HELDOUT if names.heldout_delta(n) in metrics]
    return held + [(names.eval_score(names.CHAMPION, r["name"], r["metric"]), r["name"])
                   for r in forgetting if r["scope"] != "subtask"]


def _vs_champion(metrics: dict, key: tuple[str, str]) -> dict:
    """The champion's score and the candidate minus champion (paired CI), when a champion was evaluated."""
    score, measure = key
    if names.champion_delta(measure) not in metrics:
        return {}
    return {"champion": metrics.get(score), "vs_champion": metrics[names.champion_delta(measure)],
            "vs_champion_ci": [metrics.get(names.champion_delta(measure, s)) for s in ("ci_low", "ci_high")],
            "vs_champion_p": metrics.get(names.champion_delta(measure, "p_value"))}


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
    champ = any("vs_champion" in r for r in rows)
    head = ["measure", "base", *(["champion"] if champ else []), "fine-tuned", "delta", "95% CI", "p", "MDE",
            *(["vs champion", "95% CI"] if champ else []), "n", ""]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "".join("---|" if h in ("95% CI", "") else "---:|" for h in head[1:])]
    for r in rows:
        ci = "–" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        cells = [r["measure"], f"{r['base']:.3f}"]
        cells += [_fmt(r.get("champion"), ".3f")] if champ else []
        cells += [f"{r['fine-tuned']:.3f}", f"{r['delta']:+.3f}", ci, _fmt(r["p_value"], ".3g"), _fmt(r.get("mde"), ".3f")]
        if champ:
            low, high = r.get("vs_champion_ci") or (None, None)
            cells += [_fmt(r.get("vs_champion"), "+.3f"), "–" if low is None else f"[{low:+.3f}, {high:+.3f}]"]
        lines.append("| " + " | ".join([*cells, str(r["n"]), r["flag"]]) + " |")
    if verdict is not None:
        against = f", against the base and champion v{verdict['champion']['version']}" if verdict.get("champion") else ""
        lines += ["", f"**Promotion gate ({verdict['model']}, {verdict['bound']}{against}): "
                      f"{'PASSED' if verdict['passed'] else 'FAILED'}**", ""]
        lines += [f"- {'ok' if c['passed'] else 'FAIL'}: {c['reason']}" for c in verdict["checks"]]
    if footer:
        lines += ["", footer]
    return "\n".join(lines)


@stage("report")
def report(stage_metrics: list[dict], forgetting: list[dict], out_dir: Path, verdict: Verdict | None = None) -> Report:
    merged = {k: v for m in stage_metrics for k, v in m.items()}
    if verdict is not None:  # the gate stage's result also carries its MLflow bookkeeping
        verdict = {k: verdict.get(k) for k in ("passed", "reasons", "checks", "model", "bound", "champion")}
    rows = summary_rows(merged, forgetting)
    markdown = to_markdown(rows, verdict, timing(merged))
    (out_dir / "summary.json").write_text(json.dumps({"rows": rows, "gate": verdict, "metrics": merged}, indent=2))
    (out_dir / "summary.md").write_text("# sftflow summary\n\n" + markdown + "\n")
    return {"rows": rows, "markdown": markdown, "timing": timing(merged), "metrics": {},
            "artifacts": [out_dir / "summary.json", out_dir / "summary.md"]}
