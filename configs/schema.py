"""The one typed pipeline config: its sections (training's in training.py) and `PipelineConfig`.
loader.py reads it from YAML with `--set key.path=value` overrides and validates it before any work starts."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import Field, model_validator

from sftflow.configs.base import Positive, Ratio, Section
from sftflow.configs.training import TrainConfig
from sftflow.env import SHARED_DATA

FORMAT_NAMES = Literal["auto", "messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "superni",
                       "gsm8k_calculator"]
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
        None, description="None: the tokenizer's own; a name in configs/templates/ (chatml, llama3), trl:<name> "
                          "(a template TRL ships, e.g. trl:qwen3_instruct_2507_training) or a .jinja path")
    system_prompt: str | None = None
    max_length: Positive = 512
    audit_samples: Positive = Field(4, description="masked samples rendered into the audit artifact")
    reasoning: Literal["keep", "strip"] = Field(
        "keep", description="reasoning_content and think blocks of assistant turns: kept and trained, or stripped")


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
    max_gen_toks: Positive | None = Field(
        None, description="generation budget per item of a generating benchmark (BBH); generation also stops at "
                          "the task's stop sequences; None: lm-eval's default (256)")
    mde: float | None = Field(
        None, gt=0.0, le=1.0, description="minimum detectable effect (80% power, alpha eval.alpha) the benchmark's "
                                          "base vs fine-tuned comparison should reach: the per-subtask limit "
                                          "becomes the smallest that reaches it, in place of `limit`")
    assumed_discordance: float = Field(
        0.1, gt=0.0, le=1.0, description="share of items base and fine-tuned answer differently, assumed when "
                                         "`mde` chooses the limit (the run reports the observed one)")


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

    @model_validator(mode="after")
    def _budget_where_generating(self) -> "EvalConfig":
        if self.mmlu.max_gen_toks is not None:
            raise ValueError("mmlu.max_gen_toks: MMLU scores its choices by likelihood and generates nothing")
        return self


class VsChampionConfig(Section):
    """When the model name has a champion, the candidate must also hold up against it, paired on the same items."""

    enabled: bool = True
    margin: float = Field(0.02, ge=0.0, description="held-out target: candidate minus champion must be at least "
                                                    "-margin (non-inferiority; at 0, a candidate as good as the "
                                                    "champion fails on noise about half the time)")
    max_forgetting: dict[str, Annotated[float, Field(ge=0.0)]] | None = Field(
        None, description="per benchmark: the largest drop below the champion allowed; None: gate.max_forgetting")
    bound: Literal["point", "ci"] = Field("point", description="as gate.bound, for the champion checks")
    rebaseline: bool = Field(False, description="evaluate the champion again when its cached results on its frozen "
                                                "items are missing (else the run stops and says so)")


class GateConfig(Section):
    """Promotion verdict: the fine-tuned model must gain on its task without forgetting too much."""

    target: Literal["label_acc", "exact_match", "macro_f1", "tool_call_acc"] = "label_acc"
    min_gain: float = Field(0.05, description="held-out fine-tuned minus base must be at least this")
    max_forgetting: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        {"mmlu": 0.05, "bbh": 0.05}, description="per benchmark: the largest drop (base minus fine-tuned) allowed")
    bound: Literal["point", "ci"] = Field(
        "point", description="judge the point estimates, or (ci) the pessimistic end of each 95% CI")
    model: str = Field("ft", description="which evaluated model is judged (ft, or e.g. ft_best)")
    vs_champion: VsChampionConfig = VsChampionConfig()


class MonitorConfig(Section):
    """`sftflow monitor`: the champion scored on fresh labelled traffic against its own held-out score."""

    metric: Literal["label_acc", "exact_match"] = "label_acc"
    margin: float = Field(0.05, ge=0.0, le=1.0, description="retrain when the score drops below the version's "
                          "held-out score by more than this, and the whole 95% CI of the drop is below zero")
    retrain_deployment: str | None = Field("sftflow-retrain/adhoc", description="Prefect deployment started "
                                           "with the new data as a source on a drop; null: only report")


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
    monitor: MonitorConfig = MonitorConfig()
    tracking: TrackingConfig = TrackingConfig()

    def digest(self) -> str:
        """Content hash of the resolved config (stable key order)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


