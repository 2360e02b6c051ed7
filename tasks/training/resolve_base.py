"""Stage: resolve the base model (alias, folder, GGUF or hub id) and record what it is."""

from __future__ import annotations

from pathlib import Path

from sftflow.configs.schema import ModelConfig
from sftflow.models import resolve
from sftflow.results import Base
from sftflow.tracking import stage


@stage("model")
def resolve_model(cfg: ModelConfig, offline: bool, out_dir: Path) -> Base:
    model = resolve(cfg.base, offline)
    return {"path": model.path, "digest": model.digest,
            "params": {"model.path": model.path, "model.digest": model.digest, "model.source": model.source}}
