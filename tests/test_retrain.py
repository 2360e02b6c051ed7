"""Retraining semantics: the data + config fingerprint, config resolution from the deployment form,
and "up to date" without training when neither changed."""

import json
import os
from pathlib import Path

import pytest
from conftest import make_record
from test_registry import pipeline_run

from sftflow import env
from sftflow.configs.loader import load_config
from sftflow.configs.schema import Source
from sftflow.flows.retrain import fingerprint, resolve_config, retrain
from sftflow.release import registry

REPO = Path(__file__).resolve().parents[1]


def config_for(data_file: Path, **extra):
    base = {"name": "fp-test", "data": {"root": str(data_file.parent), "sources": [{"path": data_file.name}]}}
    return load_config(None, [f"{k}={v}" for k, v in extra.items()], base=base)


def write_data(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(make_record(i, f"q{i}", f"a{i}")) + "\n" for i in range(n)))
    return path


def test_fingerprint_follows_file_contents_and_config_not_mtimes(tmp_path):
    data = write_data(tmp_path / "train.jsonl", 5)
    first = fingerprint(config_for(data))
    assert fingerprint(config_for(data)) == first
    os.utime(data, (1, 1))  # touched, same bytes: unchanged
    assert fingerprint(config_for(data)) == first
    write_data(data, 6)  # one more record: data changed, config did not
    changed = fingerprint(config_for(data))
    assert changed["dataset_digest"] != first["dataset_digest"] and changed["config_hash"] == first["config_hash"]
    assert changed["fingerprint"] != first["fingerprint"]
    other = fingerprint(config_for(data, **{"train.lora.r": 16}))  # config changed, data did not
    assert other["dataset_digest"] == changed["dataset_digest"] and other["fingerprint"] != changed["fingerprint"]


def test_hub_sources_count_by_id_and_split(tmp_path):
    cfg = load_config(None, base={"offline": False, "data": {"root": str(tmp_path), "sources": [{"hub": "org/ds"}]}})
    a = fingerprint(cfg)
    cfg.data.sources = [Source(hub="org/ds", split="test")]
    assert fingerprint(cfg)["dataset_digest"] != a["dataset_digest"]


def test_the_deployment_form_fields_override_the_config_file(data_root):
    cfg = resolve_config("smoke.yaml", [f"data.root={data_root}", "train.lora.r=16"], "other-model", "full",
                         [{"path": "gsm8k/*.jsonl", "max_records": 3}])  # a shipped config by name
    assert cfg.name == "smoke" and cfg.train.lora.r == 16 and cfg.model.base == "other-model"
    assert cfg.train.method == "full" and cfg.data.sources == [Source(path="gsm8k/*.jsonl", max_records=3)]


def test_unchanged_data_and_config_finish_up_to_date_without_training(tmp_path, data_root, prefect_server):
    overrides = [f"data.root={data_root}", "name=retrain-unit"]
    cfg = resolve_config(str(REPO / "configs/smoke.yaml"), overrides, None, None, None)
    known = registry.register_candidate(cfg.name, pipeline_run(tmp_path), {"passed": True, "reasons": []},
                                        fingerprint(cfg), {})
    runs = env.state_dir() / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    state = retrain(config_file=str(REPO / "configs/smoke.yaml"), overrides=overrides, return_state=True)
    assert state.is_completed() and state.name == "UpToDate", state
    assert f"v{known.version}" in state.message and "nothing trained" in state.message
    assert (set(runs.iterdir()) if runs.exists() else set()) == before  # no pipeline run directory
    assert len(registry.MlflowClient().search_model_versions(f"name = '{cfg.name}'")) == 1
