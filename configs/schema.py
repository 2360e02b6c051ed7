"""The one typed pipeline config. Loaded from YAML, `--set key.path=value` overrides applied,
validated before any work starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Ratio = Annotated[float, Field(ge=0.0, lt=0.5)]
Positive = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Source(Section):
    """One input: a local file/glob (relative to data.root) or a hub dataset id (online only)."""

    path: str | None = None
    hub: str | None = None
    split: str = "train"
    format: Literal["auto", "messages", "prompt_completion", "superni"] = "auto"
    name: str | None = Field(None, description="defaults to the file stem or hub id")
    max_records: Positive | None = Field(None, description="seeded subsample of at most this many")

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local file or glob) or 'hub' (dataset id)")
        return self


class DataConfig(Section):
    root: str = "../shared/data"
    sources: list[Source] = Field(min_length=1)
    seed: int = 0


class CurateConfig(Section):
    exact_dedup: bool = True
    min_chars: int = Field(1, ge=0, description="every turn must have at least this many characters")
    max_chars: Positive = 20_000
    allowed_labels: list[str] | None = None


class SplitConfig(Section):
    val_ratio: Ratio = 0.1
    test_ratio: Ratio = 0.1
    seed: int = 0
    stratify: bool = True


class ModelConfig(Section):
    base: str = Field("smollm2-135m-instruct", description="registry alias, local dir, .gguf file or hub id")
    trust_remote_code: bool = False


class TemplateConfig(Section):
    chat_template: str | None = Field(
        None, description="None: the tokenizer's own; a name in configs/templates/ (chatml, llama3) or a .jinja path")
    system_prompt: str | None = None
    max_length: Positive = 512
    audit_samples: Positive = Field(4, description="masked samples rendered into the audit artifact")


class LoraSection(Section):
    r: Positive = 8
    alpha: Positive = 16
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="None: the per-architecture default in configs/lora_targets.yaml")


class FreezeSection(Section):
    first_layers: int = Field(0, ge=0, description="freeze the embeddings and the first K transformer blocks")
    patterns: list[str] = Field([], description="also freeze parameters whose name matches one of these regexes")


class TrainConfig(Section):
    # How the trainer is built: method, precision, batching, optimiser and schedule.
    method: Literal["lora", "qlora", "full", "frozen"] = "lora"
    lora: LoraSection = LoraSection()
    freeze: FreezeSection = FreezeSection()
    merge_adapter: bool = Field(False, description="also save the base model with the adapter merged in")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU")
    batching: Literal["padded", "padding_free", "packed"] = Field(
        "padded", description="padded: TRL's default; padding_free: each batch flattened without pad tokens; "
                              "packed: records packed best-fit into rows of pack_length tokens")
    pack_length: Positive = Field(1024, description="tokens per packed row (batching: packed)")
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs` epochs")
    batch_size: Positive = 8
    grad_accum: Positive = 1
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    logging_steps: Positive = 5
    eval_steps: Positive | None = Field(None, description="validation-loss interval; None: once per epoch")
    seed: int = 0

    @model_validator(mode="after")
    def _freeze_only_when_frozen(self) -> "TrainConfig":
        wants = bool(self.freeze.first_layers or self.freeze.patterns)
        if self.method == "frozen" and not wants:
            raise ValueError("method 'frozen' needs freeze.first_layers > 0 or freeze.patterns")
        if self.method != "frozen" and wants:
            raise ValueError(f"freeze.* applies to method 'frozen' only (method is {self.method!r})")
        if self.merge_adapter and self.method not in ("lora", "qlora"):
            raise ValueError("merge_adapter needs method 'lora' or 'qlora'")
        return self


class HeldoutConfig(Section):
    max_new_tokens: Positive = 8
    batch_size: Positive = 16
    limit: Positive | None = Field(None, description="score at most this many test records")


class BenchmarkConfig(Section):
    enabled: bool = True
    subtasks: list[str] | Literal["all"] = "all"
    limit: Positive | None = Field(5, description="items per subject/subtask, seeded sample; None: all")
    num_fewshot: int = Field(ge=0)


class EvalConfig(Section):
    heldout: HeldoutConfig = HeldoutConfig()
    mmlu: BenchmarkConfig = BenchmarkConfig(num_fewshot=5)
    bbh: BenchmarkConfig = BenchmarkConfig(num_fewshot=3)
    batch_size: Positive = 8
    seed: int = 1234


class TrackingConfig(Section):
    experiment: str = "sftflow"


class PipelineConfig(Section):
    name: str = Field("sftflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    offline: bool = Field(True, description="set the hub-offline and no-telemetry variables")
    data: DataConfig
    curate: CurateConfig = CurateConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    template: TemplateConfig = TemplateConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def data_root(self) -> Path:
        return Path(self.data.root)

    def digest(self) -> str:
        """Content hash of the resolved config (stable key order)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


class ConfigError(ValueError):
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


def parse_overrides(pairs: list[str]) -> dict:
    tree: dict = {}
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
    tree: dict = dict(base or {})
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
    tree = _merge(tree, parse_overrides(list(overrides)))
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e, origin, PipelineConfig) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    return cfg


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lora.r": "8", ...} for MLflow params."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = json.dumps(tree) if isinstance(tree, list) else str(tree)
    return out
