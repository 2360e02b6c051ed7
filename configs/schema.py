"""The one typed pipeline config. Loaded from YAML, `--set key.path=value` overrides applied,
validated before any work starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftflow.env import SHARED_DATA
from sftflow.errors import UserError
from sftflow.redact import MASK, is_secret_key, redact

Ratio = Annotated[float, Field(ge=0.0, lt=0.5)]
Positive = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FORMAT_NAMES = Literal["auto", "messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "superni"]
Share = Annotated[float, Field(ge=0.0, le=1.0)]


class Source(Section):
    """One input: a local file/glob (relative to data.root) or a hub dataset id (online only).

    Files: .jsonl, .json (list of rows or a Super-NaturalInstructions task), .csv, .parquet."""

    path: str | None = None
    hub: str | None = None
    split: str = "train"
    format: FORMAT_NAMES = "auto"
    name: str | None = Field(None, description="defaults to the file stem or hub id")
    max_records: Positive | None = Field(None, description="seeded subsample of at most this many")
    weight: float | None = Field(None, gt=0.0, le=1.0, description="seeded subsample of this share of the rows")

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local file or glob) or 'hub' (dataset id)")
        return self


class DataConfig(Section):
    root: str = Field(SHARED_DATA, description="training data: sources' paths are relative to it")
    sources: list[Source] = Field(min_length=1)
    seed: int = 0


class PreflightConfig(Section):
    """Pre-flight check (schema, role order, empty turns, token counts with the base model's chat template)."""

    count_tokens: bool = Field(True, description="token counts with the base model's tokenizer and chat template")
    max_error_share: Share = Field(0.05, description="fail the run when more records than this share are invalid")


class NearDedupConfig(Section):
    """MinHash LSH over word shingles (tasks/data/dedup/minhash.py)."""

    enabled: bool = True
    shingle: Positive = Field(3, description="words per shingle")
    num_perm: Positive = 128
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="estimated Jaccard similarity that makes a duplicate")
    remove: bool = Field(True, description="drop all but the keeper of each cluster; false: keep them, "
                                           "and the split still keeps each cluster in one split")
    # Shingles in more than max(boilerplate_min, boilerplate_share * records) records are template text
    # (a task's instruction, a prompt stem) and ignored; otherwise all records of one task look alike.
    boilerplate_share: Share = 0.01
    boilerplate_min: Positive = 20
    seed: int = 1


class CurateConfig(Section):
    preflight: PreflightConfig = PreflightConfig()
    min_chars: int = Field(1, ge=0, description="every turn must have at least this many characters")
    max_chars: Positive = 20_000
    min_tokens: int = Field(0, ge=0, description="templated tokens per record (needs preflight.count_tokens)")
    max_tokens: Positive | None = None
    max_repetition: Share = Field(0.5, description="largest allowed share of repeated word 3-grams in a turn")
    max_garbled: Share = Field(0.05, description="largest allowed share of control/replacement characters")
    reject_patterns: list[str] = Field(
        default_factory=lambda: [r"\bas an ai (language )?model\b", r"\bi(?: am|'m) sorry,? but i can(?:no|')t\b",
                                 r"\bi cannot (?:help|assist) with\b", r"lorem ipsum"],
        description="regexes (case-insensitive) for refusals and boilerplate in assistant turns")
    allowed_labels: list[str] | None = Field(
        None, description="keep only records whose label is one of these: the `label` field, or for records "
                          "without one (chat formats) the final assistant turn, stripped of surrounding whitespace")
    on_bad_record: Literal["reject", "fail"] = Field(
        "reject", description="a line that cannot be read as a record (invalid JSON, not UTF-8, oversize, wrong "
                              "schema, unknown role): reject writes it to load_rejects.jsonl with file:line and "
                              "reason (counted against preflight.max_error_share); fail stops at the first")
    max_record_bytes: Positive = Field(4_000_000, description="a raw record (one JSONL line) larger than this is "
                                                             "rejected as oversize without being parsed")
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()

    @model_validator(mode="after")
    def _patterns_compile(self) -> "CurateConfig":
        import re

        for p in self.reject_patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"reject_patterns: {p!r} is not a valid regex: {exc}") from None
        return self


class DecontamConfig(Section):
    """Word n-gram overlap against the run's benchmarks (MMLU, BBH) and its own test split."""

    enabled: bool = True
    ngram: Positive = Field(13, description="words per n-gram")
    min_words: Positive = Field(6, description="items shorter than `ngram` words must appear whole; shorter "
                                                "than this they are too generic to count and are skipped")
    boilerplate_df: Positive = Field(5, description="n-grams shared by more than this many reference items "
                                                    "(instructions, prompts) are not evidence of a leak")


class SplitConfig(Section):
    val_ratio: Ratio = 0.1
    test_ratio: Ratio = 0.1
    seed: int = 0
    stratify: bool = True
    group_key: str | None = Field(None, description="record field or meta.KEY whose equal values stay in one "
                                                    "split (e.g. source, meta.conversation_id)")
    decontam: DecontamConfig = DecontamConfig()


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


# --- how training is run (issue 4, second half): checkpoints, early stopping, launcher ---
class CheckpointSection(Section):
    """Checkpoints are what a killed training resumes from and what the best model is chosen among."""

    every_steps: Positive | None = Field(
        None, description="checkpoint interval; None: at every validation (eval_steps, else once per epoch)")
    keep: Positive = Field(2, description="most recent checkpoints kept while training (the best is kept too)")


class EarlyStoppingSection(Section):
    patience: Positive | None = Field(
        None, description="stop after this many validations without improvement; None: off")
    min_delta: float = Field(0.0, ge=0.0, description="a validation loss must drop by more than this to count")


class LauncherSection(Section):
    kind: Literal["inprocess", "accelerate"] = Field(
        "inprocess", description="inprocess: in the flow's process; accelerate: `accelerate launch` workers")
    num_processes: Positive = Field(1, description="data-parallel processes (accelerate only)")
    config_file: str | None = Field(None, description="accelerate config YAML, e.g. configs/accelerate/fsdp.yaml")

    @model_validator(mode="after")
    def _accelerate_options(self) -> "LauncherSection":
        if self.kind == "inprocess" and (self.num_processes > 1 or self.config_file):
            raise ValueError("num_processes > 1 and config_file need kind: accelerate")
        return self


ADAPTER_METHODS = ("lora", "qlora")  # saved as a PEFT adapter on the base; the others as a whole model


class TrainConfig(Section):
    # How the trainer is built: method, precision, batching, optimiser and schedule.
    method: Literal["lora", "qlora", "full", "frozen"] = "lora"
    lora: LoraSection = LoraSection()
    freeze: FreezeSection = FreezeSection()
    merge_adapter: bool = Field(False, description="also save the base model with the adapter merged in")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU")
    batching: Literal["padded", "padding_free", "packed"] = Field(
        "padding_free", description="padding_free: each batch flattened into one row without pad tokens (the "
                                    "same batches and losses as padded, faster); padded: TRL's default; "
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
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="Liger's fused RMSNorm/RoPE/SwiGLU kernels through TRL (CUDA, `sftflow[gpu]`); auto: "
                            "on when CUDA and liger-kernel are there. TRL fuses the LM head with the loss itself")
    logging_steps: Positive = 5
    eval_steps: Positive | None = Field(None, description="validation-loss interval; None: once per epoch")
    seed: int = 0
    # how training is run: checkpoints, early stopping, processes
    checkpoint: CheckpointSection = CheckpointSection()
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    launcher: LauncherSection = LauncherSection()

    @model_validator(mode="after")
    def _checkpoints_align_with_validation(self) -> "TrainConfig":
        # The best model is chosen among saved checkpoints, so checkpoints must fall on validation steps.
        every = self.checkpoint.every_steps
        if every is not None and (self.eval_steps is None or every % self.eval_steps):
            raise ValueError(f"checkpoint.every_steps ({every}) must be a multiple of eval_steps "
                             f"({self.eval_steps or 'unset: set it'}), so that every checkpoint has a validation loss")
        return self

    @model_validator(mode="after")
    def _freeze_only_when_frozen(self) -> "TrainConfig":
        wants = bool(self.freeze.first_layers or self.freeze.patterns)
        if self.method == "frozen" and not wants:
            raise ValueError("method 'frozen' needs freeze.first_layers > 0 or freeze.patterns")
        if self.method != "frozen" and wants:
            raise ValueError(f"freeze.* applies to method 'frozen' only (method is {self.method!r})")
        if self.merge_adapter and self.method not in ADAPTER_METHODS:
            raise ValueError("merge_adapter needs method 'lora' or 'qlora'")
        return self


class HeldoutConfig(Section):
    max_new_tokens: Positive = 8
    batch_size: Positive = 16
    limit: Positive | None = Field(None, description="score at most this many test records")
    examples: int = Field(8, ge=0, description="side-by-side generations written to examples.md")


class BenchmarkConfig(Section):
    enabled: bool = True
    subtasks: list[str] | Literal["all"] = "all"
    limit: Positive | None = Field(5, description="items per subject/subtask, seeded sample; None: all")
    num_fewshot: int = Field(ge=0)


class EvalConfig(Section):
    benchmark_root: str = Field(
        SHARED_DATA, description="folder of the MMLU/BBH originals (mmlu/, bbh/) the eval and decontamination read; "
                                 "checked when the config loads")
    heldout: HeldoutConfig = HeldoutConfig()
    mmlu: BenchmarkConfig = BenchmarkConfig(num_fewshot=5)
    bbh: BenchmarkConfig = BenchmarkConfig(num_fewshot=3)
    tasks: list[str] = Field([], description="stock lm-eval task or group names (need the hub: offline: false)")
    tasks_limit: Positive | None = Field(None, description="items per stock task (lm-eval's own first-n limit)")
    apply_chat_template: bool = Field(False, description="lm-eval prompts through the base model's chat template")
    batch_size: Positive = 8
    seed: int = 1234
    bootstrap_iters: Positive = Field(2000, description="paired bootstrap resamples for the 95% CIs")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="significance level of the paired tests")


class GateConfig(Section):
    """Promotion verdict: the fine-tuned model must gain on its task without forgetting too much."""

    target: Literal["label_acc", "exact_match", "macro_f1"] = "label_acc"
    min_gain: float = Field(0.05, description="held-out fine-tuned minus base must be at least this")
    max_forgetting: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        {"mmlu": 0.05, "bbh": 0.05}, description="per benchmark: the largest drop (base minus fine-tuned) allowed")
    bound: Literal["point", "ci"] = Field(
        "point", description="judge the point estimates, or (ci) the pessimistic end of each 95% CI")
    model: str = Field("ft", description="which evaluated model is judged (ft, or e.g. ft_best)")


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
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def data_root(self) -> Path:
        return Path(self.data.root)

    def digest(self) -> str:
        """Content hash of the resolved config (stable key order)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


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
    cfg.eval.benchmark_root = str(Path(cfg.eval.benchmark_root).expanduser().resolve())
    check_benchmarks(cfg, origin)
    return cfg


def check_benchmarks(cfg: PipelineConfig, origin: str = "config") -> None:
    """Every subtask the eval runs (and decontamination indexes) must exist, with all its files, before any
    work starts: a run that trained for an hour must not fail at evaluation, nor decontaminate against nothing."""
    from sftflow.tasks.evaluation.mirrors import BENCHMARKS, missing_files, missing_message, unknown_subtasks

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
