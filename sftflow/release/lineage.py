"""A model name's life: every registered version with what it trained on and how it was judged."""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sftflow import history
from sftflow import metrics as names
from sftflow.release.registry import CHALLENGER, CHAMPION, RegistryError, _alias

DATA = ("new", "seen", "near_seen", "bridges")


def versions(name: str, client: MlflowClient | None = None) -> list[dict]:
    """One row per version, oldest first: role, gate verdict and what it faced, data sizes and deltas."""
    client = client or MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise RegistryError(f"no registered model `{name}`") from exc
    if not found:
        raise RegistryError(f"no registered model `{name}`: register a run with `sftflow run CONFIG --register`")
    roles = {str(v.version): alias for alias in (CHAMPION, CHALLENGER) if (v := _alias(client, name, alias))}
    recorded = {v.version: v for v in history.versions(name)}
    rows = []
    for v in sorted(found, key=lambda v: int(v.version)):
        v = client.get_model_version(name, v.version)
        run_id = v.tags.get("mlflow.parent_run_id", "")
        run = client.get_run(run_id).data if run_id else None
        m, target = (run.metrics, run.params.get("gate.target", "label_acc")) if run else ({}, "label_acc")
        h = recorded.get(int(v.version))
        reasons = json.loads(v.tags.get("gate.reasons", "[]"))
        rows.append({
            "version": int(v.version), "role": roles.get(str(v.version), ""), "run_id": run_id,
            "gate": v.tags.get("gate.passed") == "true", "judged_against": v.tags.get("sftflow.judged_against", "base"),
            "failed": [r for r in reasons if " < " in r or "not measured" in r or "changed while judged" in r],
            "splits": h.counts if h else {s: int(m.get(f"split/{s}", 0)) for s in ("train", "val", "test")},
            "data": {k: int(m[f"split/{k}"]) for k in DATA if f"split/{k}" in m},
            "gain": m.get(names.heldout_delta(target)), "vs_champion": m.get(names.champion_delta(target)),
            "promotion": v.tags.get("sftflow.promotion", "")})
    return rows
