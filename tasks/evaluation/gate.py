"""Promotion verdict: does the fine-tuned model gain on its task without forgetting too much?

`verdict(metrics, cfg)` is a plain function over the run's flat metrics (the held-out and benchmark
stages' names); the stage writes gate.json, logs `gate/passed` (1.0/0.0) and tags the run and its
parent `sftflow.gate=passed|failed` so the registry step and the MLflow UI can act on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftflow import metrics as names
from sftflow.configs.schema import GateConfig
from sftflow.results import Verdict
from sftflow.tracking import stage


def _power(check: dict, metrics: dict, ci_low: float | None, mde_key: str, kind: str) -> dict:
    """Flag a check whose test cannot see an effect the size of its margin: the MDE (80% power) exceeds the
    margin and the CI does not settle it (its lower end below the threshold)."""
    mde, threshold = metrics.get(mde_key), check["threshold"]
    check["mde"] = mde
    check["underpowered"] = bool(mde is not None and mde > abs(threshold) and (ci_low is None or ci_low < threshold))
    if check["underpowered"]:
        if kind == "drop":
            drop = -ci_low if ci_low is not None and ci_low < 0 else mde
            check["reason"] += (f"; underpowered (MDE {mde:.4f} > margin {abs(threshold):.4f}): cannot rule out "
                                f"a drop of {drop:.4f}")
        else:
            check["reason"] += (f"; underpowered (MDE {mde:.4f} > {threshold:.4f}): a gain smaller than "
                                f"{mde:.4f} may go undetected")
    return check


def _check(name: str, metrics: dict, keys: tuple[str, str, str], bound: str, threshold: float, what: str,
           kind: str) -> dict:
    """One requirement `value >= threshold`; keys = (point delta, CI lower end, MDE), the value chosen by
    `bound`; kind ("gain" or "drop") words the power note."""
    field = keys[0] if bound == "point" else keys[1]
    value = metrics.get(field)
    if value is None:
        return {"check": name, "metric": field, "value": None, "threshold": threshold, "passed": False,
                "reason": f"{name}: not measured ({field} missing)", "mde": None, "underpowered": False}
    passed = value >= threshold
    shown = "delta" if bound == "point" else "CI lower bound"
    reason = f"{what}: {shown} {value:+.4f} {'>=' if passed else '<'} {threshold:+.4f}"
    check = {"check": name, "metric": field, "value": value, "threshold": threshold, "passed": passed,
             "reason": reason}
    return _power(check, metrics, metrics.get(keys[1]), keys[2], kind)


def verdict(metrics: dict, cfg: GateConfig, champion: dict | None = None) -> dict:
    """{"passed": bool, "reasons": [str], "checks": [...], "model": tag, "bound": ..., "champion": ...}.

    Passes when the held-out gain of `cfg.target` is at least `min_gain` and, for every benchmark in
    `max_forgetting`, fine-tuned minus base is at least `-max_drop` (with `bound: ci`, the CI's lower end:
    a non-inferiority test against the margin). With a `champion` ({"version": ...}), also when the candidate
    minus the champion, paired on the same items, is at least `-vs_champion.margin` on the target and at least
    `-max_drop` on every benchmark. A requirement that was not measured fails: a verdict never rests on a
    benchmark that was switched off, nor falls back to the base alone. An underpowered check says so.
    """
    gain = tuple(names.heldout_delta(cfg.target, s, cfg.model) for s in (None, "ci_low", "mde"))
    checks = [_check("gain", metrics, gain, cfg.bound, cfg.min_gain, f"held-out {cfg.target} gain", "gain")]
    for bench, max_drop in cfg.max_forgetting.items():
        drop = tuple(names.forgetting(bench, s, cfg.model) for s in ("delta", "ci_low", "mde"))
        checks.append(_check(f"forgetting:{bench}", metrics, drop, cfg.bound, -max_drop, f"{bench} forgetting",
                             "drop"))
    vs = cfg.vs_champion
    if champion is not None and cfg.model != names.FT:  # the stages pair only the fine-tuned model with it
        checks.append({"check": "champion", "metric": None, "value": None, "threshold": None, "passed": False,
                       "reason": f"vs champion v{champion['version']}: not measured for `{cfg.model}` (only "
                                 f"`{names.FT}` is compared with the champion)", "mde": None, "underpowered": False})
    elif champion is not None:
        who = f"vs champion v{champion['version']}"
        keys = tuple(names.champion_delta(cfg.target, s) for s in (None, "ci_low", "mde"))
        checks.append(_check("champion:gain", metrics, keys, vs.bound, -vs.margin, f"{who}: held-out {cfg.target}",
                             "drop"))
        for bench, max_drop in (cfg.max_forgetting if vs.max_forgetting is None else vs.max_forgetting).items():
            keys = tuple(names.champion_delta(bench, s) for s in (None, "ci_low", "mde"))
            checks.append(_check(f"champion:forgetting:{bench}", metrics, keys, vs.bound, -max_drop,
                                 f"{who}: {bench}", "drop"))
    return {"passed": all(c["passed"] for c in checks), "reasons": [c["reason"] for c in checks],
            "checks": checks, "model": cfg.model, "bound": cfg.bound, "champion": champion}


def _tag_runs(passed: bool) -> None:
    """Tag the gate's MLflow run and its parent (the flow run), when there is an active run."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    value = "passed" if passed else "failed"
    mlflow.set_tag("sftflow.gate", value)
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        mlflow.MlflowClient().set_tag(parent, "sftflow.gate", value)


@stage("gate")
def gate(metric_sets: list[dict], cfg: GateConfig, out_dir: Path, champion: dict | None = None) -> Verdict:
    result = verdict({k: v for m in metric_sets for k, v in m.items()}, cfg, champion)
    (out_dir / "gate.json").write_text(json.dumps(result, indent=2))
    _tag_runs(result["passed"])
    return {**result, "metrics": {names.GATE_PASSED: float(result["passed"])},
            "params": {"gate.verdict": "passed" if result["passed"] else "failed",
                       "gate.reasons": " | ".join(result["reasons"])},
            "artifacts": [out_dir / "gate.json"]}
