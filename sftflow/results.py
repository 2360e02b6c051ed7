"""What each stage returns: the protocol between the stages and the flows.

Stages pass file paths, not data, so a result is a small JSON-able dict (the stage cache stores it as such);
these TypedDicts name its keys. Every result may carry `metrics` (logged on the stage's MLflow run and mirrored
on the parent run), `params` and `artifacts` (files or folders logged on the stage's run): see
sftflow.tracking.run_stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from typing_extensions import NotRequired  # typing has it from Python 3.11


class StageResult(TypedDict, total=False):
    metrics: dict[str, float]
    params: dict[str, str | int | float]
    artifacts: list[Path]


class Base(StageResult):
    """The resolved base model: a local safetensors folder and the digest of its files."""
    path: str
    digest: str


class Loaded(StageResult):
    records: str  # records.jsonl: canonical records
    rejects: str  # load_rejects.jsonl: every unreadable row with file:line and reason
    ledger: dict  # rows in, rejected, per source, by reason


class Curated(StageResult):
    records: str  # curated.jsonl
    counts: dict  # kept and removed, per rule
    ledger: dict


class Splits(StageResult):
    paths: dict[str, str]  # train / val / test JSONL
    digests: dict[str, str]  # sha256 per split
    report_md: str  # the curation report


class Tokens(StageResult):
    paths: dict[str, str]  # train / val token rows, and the tokenizer folder carrying the chat template


class Trained(StageResult):
    model_path: str  # the model to evaluate: the base (with adapter_path), the full model, or the merged one
    adapter_path: str | None
    merged_path: NotRequired[str]


class ModelRef(TypedDict, total=False):
    """A model to evaluate: weights folder, optional PEFT adapter on it, content digest (cache key), tokenizer."""
    path: str
    adapter: str | None
    digest: str
    tokenizer: str


class Heldout(StageResult):
    confusion: dict  # per model: labels, counts


class Benchmarks(StageResult):
    forgetting: dict[str, list[dict]]  # per compared model: rows of delta, CI, p per benchmark/category/subtask


class Verdict(StageResult):
    passed: bool
    reasons: list[str]  # one per check, passed or not
    checks: list[dict]  # check, metric, value, threshold, passed, reason
    model: str  # the model the gate judged (tag)
    bound: str  # point or ci
    champion: dict | None  # the version judged against ({"version", ...}), None when there was no champion


class Report(StageResult):
    rows: list[dict]  # the summary table: measure, base, fine-tuned, delta, CI, p, n
    markdown: str
    timing: str


class PipelineResult(TypedDict):
    mlflow_run_id: str
    experiment_id: str
    run_dir: str
    rows: list[dict]
    gate: dict  # {"passed", "reasons"}
    eval_timing: str
