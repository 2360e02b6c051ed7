"""Loading a pipeline config: YAML files, `--set key.path=value` overrides, validation with messages that name
the file, field, value and what is allowed; the benchmark files the config needs; flattening for MLflow params."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sftflow.configs.schema import PipelineConfig
from sftflow.errors import UserError
from sftflow.redact import MASK, is_secret_key, redact


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file, field, value and what is allowed."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def _describe(err: dict, origin: str, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    got = err.get("input")
    line = f"{origin}: {loc or '<root>'}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        # Name the fields that are allowed at that level.
        target: Any = model
        for part in err["loc"][:-1]:
            field = target.model_fields.get(part) if isinstance(target, type) else None
            target = field.annotation if field else None
        if isinstance(target, type) and issubclass(target, BaseModel):
            line += f"; allowed here: {', '.join(target.model_fields)}"
    elif got is not None and not isinstance(got, dict):
        line += f" (got {got!r})"
    return line


def apply_overrides(tree: dict, pairs: list[str]) -> dict:
    """Set each `key.path=value` in order; the value replaces what was there, a mapping included, so
    `--set gate.max_forgetting={mmlu: 1.0}` drops `bbh` from the gate and `={}` empties it."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> PipelineConfig:
    """YAML file (or `base` dict) + overrides -> validated config with data.root made absolute."""
    origin = str(path) if path else "config"
    tree: dict = copy.deepcopy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = _merge(tree, loaded)
    tree = apply_overrides(tree, list(overrides))
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e, origin, PipelineConfig) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.eval.benchmark_root = str(Path(cfg.eval.benchmark_root).expanduser().resolve())
    check_benchmarks(cfg, origin)
    return cfg


def check_benchmarks(cfg: PipelineConfig, origin: str = "config") -> None:
    """Every subtask the eval runs (and decontamination indexes) must exist, with all its files, before any
    work starts: a run that trained for an hour must not fail at evaluation, nor decontaminate against nothing."""
    from sftflow.tasks.evaluation.catalog import BENCHMARKS, missing_files, missing_message, unknown_subtasks

    wanted = {name: getattr(cfg.eval, name).subtasks for name in BENCHMARKS if getattr(cfg.eval, name).enabled}
    if unknown := [msg for name, subs in wanted.items() if (msg := unknown_subtasks(name, subs))]:
        raise ConfigError(f"{origin}: " + "\n".join(unknown))
    if missing := missing_files(Path(cfg.eval.benchmark_root), wanted):
        raise ConfigError(f"{origin}: " + missing_message(Path(cfg.eval.benchmark_root), missing))


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lora.r": "8", ...} for MLflow params; secrets masked (sftflow.redact)."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    tree = redact(tree)
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    out[key] = MASK if is_secret_key(key) else json.dumps(tree) if isinstance(tree, list) else str(tree)
    return out
