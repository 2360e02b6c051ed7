"""MLflow model registry: one registered model per pipeline name, one version per candidate.

A version is created from the candidate's LoggedModel (packaging.py: transformers flavor, chat task), so
`models:/NAME@champion` loads with `mlflow.pyfunc.load_model` and serves with `mlflow models serve`.

Aliases: `champion` is the version in service; `challenger` the latest candidate that is not champion
(it failed the gate, or awaits a human). The promotion gate's verdict decides; `promote` and `rollback`
let a human override it. Each version that became champion records the one it replaced
(`sftflow.previous_champion`), so rollback walks back through earlier champions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sftflow.configs.training import ADAPTER_METHODS
from sftflow import history
from sftflow.errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS = "sftflow.previous_champion"
log = logging.getLogger("sftflow.registry")


class RegistryError(UserError, RuntimeError):
    pass


def _alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion(name: str, client: MlflowClient | None = None):
    return _alias(client or MlflowClient(), name, CHAMPION)


def _train_run(client: MlflowClient, parent_run_id: str):
    """The `train` stage's child run, which holds the adapter (LoRA) or the full model."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], max_results=1,
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                            "and tags.`sftflow.stage` = 'train'")
    if not runs:
        raise RegistryError(f"MLflow run {parent_run_id} has no `train` stage run to register")
    return parent, runs[0]


def find_version(name: str, fingerprint: str, client: MlflowClient | None = None):
    """The newest version trained from exactly this data and config, or None."""
    client = client or MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`sftflow.fingerprint` = '{fingerprint}'")
    except MlflowException:
        return None
    newest = max(found, key=lambda v: int(v.version), default=None)
    return client.get_model_version(name, str(newest.version)) if newest else None


def _move_champion(client: MlflowClient, name: str, version: str) -> None:
    current = _alias(client, name, CHAMPION)
    if current is not None and str(current.version) == version:
        return
    if current is not None:
        client.set_model_version_tag(name, version, PREVIOUS, str(current.version))
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)


def register_candidate(name: str, parent_run_id: str, verdict: dict, fingerprint: dict, summary: dict,
                       client: MlflowClient | None = None, promote: bool = True):
    """Register the run's trained weights as a new version of `name`; the verdict moves `champion`.

    verdict: the promotion gate's {"passed": bool, "reasons": [str, ...]}.
    fingerprint: {"fingerprint", "dataset_digest", "config_hash"} of the run's data and config.
    summary: {measure: delta} of the run's evaluation, stored as a tag for the registry UI.
    promote: False leaves a passing version as challenger, for a human to promote (a sweep's best trial).
    """
    from sftflow.release.packaging import log_train_model

    client = client or MlflowClient()
    parent, train = _train_run(client, parent_run_id)
    kind = "adapter" if parent.data.params.get("train.method") in ADAPTER_METHODS else "model"
    logged = log_train_model(client, parent_run_id, train.info.run_id)
    try:
        client.create_registered_model(name, description=f"sftflow pipeline `{name}`: fine-tuned candidates")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"sftflow.fingerprint": fingerprint["fingerprint"],
            "sftflow.dataset_digest": fingerprint["dataset_digest"],
            "sftflow.config_hash": fingerprint["config_hash"],
            "sftflow.base_model": parent.data.params.get("model.base", ""),
            "sftflow.kind": kind,
            "sftflow.eval_summary": json.dumps(summary, sort_keys=True)[:4900],
            "gate.passed": str(bool(verdict["passed"])).lower(),
            "gate.reasons": json.dumps(list(verdict.get("reasons", [])))[:4900],
            "mlflow.parent_run_id": parent_run_id}
    version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=train.info.run_id,
                                          tags=tags, description=f"from run {parent.info.run_name}",
                                          model_id=logged.model_id)
    client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    record_history(client, name, int(version.version), parent, verdict, train.info.run_id)
    judged = (verdict.get("champion") or {}).get("version")
    client.set_model_version_tag(name, str(version.version), "sftflow.judged_against", f"v{judged}" if judged else "base")
    if verdict["passed"] and promote:
        current = _alias(client, name, CHAMPION)
        if (str(current.version) if current else None) != (str(judged) if judged else None):
            # another candidate became champion while this one was judged: it never faced that one
            note = (f"champion changed while judged (against {f'v{judged}' if judged else 'the base only'}; "
                    f"champion is now v{current.version}): left as challenger, rerun to judge it against "
                    f"v{current.version}")
            client.set_model_version_tag(name, str(version.version), "gate.reasons",
                                         json.dumps([*verdict.get("reasons", []), note])[:4900])
            client.set_model_version_tag(name, str(version.version), "sftflow.promotion", note)
        else:
            _move_champion(client, name, str(version.version))
    return client.get_model_version(name, version.version)


def record_history(client: MlflowClient, name: str, version: int, parent, verdict: dict, train_run_id: str) -> None:
    """Keep what the version trained and was judged on (sftflow/history.py), in the state dir and in its run."""
    run_dir = parent.data.tags.get("sftflow.run_dir")
    split_dir = Path(run_dir) / "split" if run_dir else None
    if split_dir is None or not (split_dir / "index.jsonl").is_file():
        log.warning("%s v%s: run %s has no data stage index; its records are not in the history",
                    name, version, parent.info.run_id)
        return
    judged_on = Path(run_dir) / "champion" / "heldout_items.jsonl"  # its test split + a champion's frozen items
    swept = Path(run_dir) / "benchmarks" / "tasks.json"
    path = history.record(name, version, split_dir, {"run_id": parent.info.run_id,
                                                     "gate_passed": bool(verdict["passed"])},
                          judged_on if judged_on.is_file() else None, swept if swept.is_file() else None)
    client.log_artifacts(parent.info.run_id, str(path), f"history/v{version}")
    client.set_model_version_tag(name, str(version), "sftflow.history", str(path))
    log_frozen_set(client, train_run_id, path)


def log_frozen_set(client: MlflowClient, run_id: str, path: Path) -> None:
    """The items the version was judged on, as MLflow datasets of the run it was registered from: its held-out
    test items (`frozen_eval`) and the benchmark tasks by content fingerprint (`frozen_benchmarks`)."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    from sftflow.records import read_jsonl
    from sftflow.tracking import unique_race_retry

    frames = {"frozen_eval": pd.DataFrame(
        [{"id": r.get("id"), "source": r.get("source"), "label": r.get("label"),
          "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in read_jsonl(path / "test.jsonl")],
        columns=["id", "source", "label", "messages"])}
    if (path / history.BENCHMARKS).is_file():
        frames["frozen_benchmarks"] = pd.DataFrame(json.loads((path / history.BENCHMARKS).read_text()))
    inputs = []
    for context, df in frames.items():
        with warnings.catch_warnings():  # a local path fits two equivalent local source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=str(path), name=f"{path.parent.name}-{path.name}-{context}")
            entity = dataset._to_mlflow_entity()  # its schema is inferred here
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    unique_race_retry(lambda: client.log_inputs(run_id, datasets=inputs))


def promote(name: str, version: str | None = None, client: MlflowClient | None = None):
    """Make `version` (default: the challenger) the champion."""
    client = client or MlflowClient()
    if version is None:
        challenger = _alias(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{name}: no challenger to promote; name a version")
        version = str(challenger.version)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name}: no version {version}") from exc
    _move_champion(client, name, str(version))
    return client.get_model_version(name, str(version))


def rollback(name: str, client: MlflowClient | None = None):
    """Move `champion` back to the version it replaced."""
    client = client or MlflowClient()
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name}: has no champion")
    previous = current.tags.get(PREVIOUS)
    if not previous:
        raise RegistryError(f"{name}: champion v{current.version} replaced no earlier champion")
    client.set_registered_model_alias(name, CHAMPION, previous)
    return client.get_model_version(name, previous)
