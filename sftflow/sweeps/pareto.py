"""A sweep trial's score is the promotion gate's question, and the sweep's answer is a Pareto front.

score: the held-out target gain (maximised) and, per benchmark the gate bounds, the drop beyond its allowance
(a constraint, <= 0 feasible), read from the trial's pipeline metrics with the gate's own checks.
pareto_front: the trials no other trial beats on both gain and worst forgetting.
"""

from __future__ import annotations

from sftflow.configs.schema import GateConfig
from sftflow.tasks.evaluation.gate import verdict

UNMEASURED = 1.0  # the constraint of a benchmark that was not measured: infeasible, never silently passed


def score(metrics: dict, gate: GateConfig, champion: dict | None = None) -> dict:
    """{"gain", "worst_forgetting", "constraints", "feasible", "passed", "reasons", "champion"} of one trial's
    metrics; `champion` ({"version"}): the champion the trial was judged against, whose checks `passed` includes.

    gain and forgetting use the gate's bound (point estimates, or the pessimistic CI ends); a forgetting
    constraint is `drop - max_drop`; feasible = no benchmark forgets beyond its allowance; passed = the
    whole gate (the gain's minimum too)."""
    v = verdict(metrics, gate, champion)
    gain = next(c["value"] for c in v["checks"] if c["check"] == "gain")
    drops = [c for c in v["checks"] if c["check"].startswith("forgetting:")]
    constraints = [UNMEASURED if c["value"] is None else c["threshold"] - c["value"] for c in drops]
    measured = [0.0 - c["value"] for c in drops if c["value"] is not None]  # 0.0 - x: no "-0.0"
    worst = max(measured) if measured else (None if drops else 0.0)  # no benchmark bounded: nothing to forget
    return {"gain": gain, "worst_forgetting": worst, "constraints": constraints,
            "feasible": all(c <= 0 for c in constraints), "passed": v["passed"], "reasons": v["reasons"],
            "champion": champion}


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on gain (higher) and worst forgetting (lower), and better on one."""
    return (a["gain"] >= b["gain"] and a["worst_forgetting"] <= b["worst_forgetting"]
            and (a["gain"] > b["gain"] or a["worst_forgetting"] < b["worst_forgetting"]))


def pareto_front(results: list[dict]) -> list[dict]:
    """The non-dominated results (each a dict with gain and worst_forgetting; others ignored), in input order.
    Results without both numbers (failed trials) are never on the front."""
    scored = [r for r in results if r.get("gain") is not None and r.get("worst_forgetting") is not None]
    return [r for r in scored if not any(dominates(o, r) for o in scored)]


def best(results: list[dict]) -> dict | None:
    """The trial that passes the gate with the largest gain (ties: less forgetting), or None."""
    passing = [r for r in results if r.get("passed")]
    return max(passing, key=lambda r: (r["gain"], -r["worst_forgetting"]), default=None)


def fmt(value, signed: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4g}"
    return str(value)


def table(results: list[dict], param_names: list[str]) -> str:
    """Markdown: one row per trial (params, gain, worst forgetting, feasible, gate, front, state, MLflow run),
    best gain first; failed trials last."""
    front = {id(r) for r in pareto_front(results)}
    rows = sorted(results, key=lambda r: (r.get("gain") is None, -(r.get("gain") or 0.0), r["trial"]))
    head = ["trial", *param_names, "gain", "worst forgetting", "feasible", "gate", "Pareto", "state", "MLflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scored = r.get("gain") is not None
        cells = [str(r["trial"]), *(fmt(r.get("params", {}).get(n)) for n in param_names),
                 fmt(r.get("gain"), True), fmt(r.get("worst_forgetting"), True),
                 ("yes" if r.get("feasible") else "no") if scored else "—",
                 ("passed" if r.get("passed") else "failed") if scored else "—",
                 "★" if id(r) in front else "", r.get("state", ""), r.get("run_id") or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
