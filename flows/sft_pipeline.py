"""The SFT recipe: model -> load -> curate -> split -> template -> train -> evaluate -> gate -> report.

Each step is a Prefect task wrapping a plain function in tasks/; each runs in its own child MLflow
run under one parent run per flow run, and writes into this flow run's own directory.
"""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sftflow import links
from sftflow.configs.schema import PipelineConfig
from sftflow.metrics import CHAMPION
from sftflow.models import model_digest
from sftflow.release import champion
from sftflow.redact import scrub
from sftflow.results import (
    Base,
    Benchmarks,
    Curated,
    Heldout,
    Loaded,
    ModelRef,
    PipelineResult,
    Report,
    Splits,
    Tokens,
    Trained,
    Verdict,
)
from sftflow.stack.entry import FlowEntry
from sftflow.tasks.data.curate import curate
from sftflow.tasks.data.decontam import targets as decontam_targets
from sftflow.tasks.data.load import load
from sftflow.tasks.data.split import split
from sftflow.tasks.evaluation.benchmarks import benchmarks
from sftflow.tasks.evaluation.gate import gate
from sftflow.tasks.evaluation.heldout import heldout
from sftflow.tasks.evaluation.report import report
from sftflow.tasks.training.resolve_base import resolve_model
from sftflow.tasks.training.run import run_training
from sftflow.tasks.training.setup import check_hardware
from sftflow.tasks.training.template import template


def remember_ft(run_id: str, ft: ModelRef, base_path: str, champion_version: str | None) -> None:
    """Tag the run with the model it evaluated as "ft", so a later run can evaluate it as the champion, and
    with the champion it is judged against."""
    tags = dict(zip(champion.FT_TAGS, (ft["path"], ft.get("adapter") or "", ft["digest"])))
    tags["sftflow.judged_against"] = f"v{champion_version}" if champion_version else "base"
    client = mlflow.MlflowClient()
    for key, value in {**tags, "sftflow.base_path": base_path}.items():
        client.set_tag(run_id, key, value)


def prepare_data(ctx, config: PipelineConfig, tokenizer: str) -> Splits:
    """load -> curate (pre-flight, filters, exact + near dedup) -> split (grouped, stable across data versions:
    what earlier versions of `config.name` saw keeps its split; decontaminated)."""
    loaded: Loaded = load.task(ctx, config.data, policy=config.curate)
    curated: Curated = curate.task(ctx, loaded["records"], config.curate, tokenizer=tokenizer,
                                   max_length=config.template.max_length,
                                   system_prompt=config.template.system_prompt, load_rejects=loaded["rejects"])
    splits: Splits = split.task(ctx, curated["records"], config.split,
                                upstream={"load": loaded["ledger"], "curate": curated["ledger"]},
                                benchmarks=decontam_targets(config.eval), benchmark_root=config.eval.benchmark_root,
                                near=config.curate.near_dedup, model_name=config.name)
    create_markdown_artifact(key="sftflow-curation", markdown=splits["report_md"],
                             description="data curation report: accounting, rejects, duplicates, contamination")
    return splits


@flow(name="sftflow-curate")
def curate_pipeline(config: PipelineConfig) -> dict:
    """Only the data stage (and the base model's tokenizer for the pre-flight token counts)."""
    entry = FlowEntry()
    state = entry.admit(config)
    with entry.parent_run(config, state) as ctx:
        base = resolve_model.task(ctx, config.model, config.offline)
        splits = prepare_data(ctx, config, base["path"])
    return {"mlflow_run_id": ctx.parent_run_id, "run_dir": ctx.run_dir, "report_md": splits["report_md"],
            "paths": splits["paths"]}


@flow(name="sft-pipeline")
def sft_pipeline(config: PipelineConfig, nest_under: str | None = None) -> PipelineResult:
    """The whole job; `nest_under`: an MLflow run id (a sweep's) to nest this run's MLflow run under."""
    entry = FlowEntry()
    state = entry.admit(config)  # deployed on its own, its run form is a remote entry point too
    trust = config.model.trust_remote_code
    check_hardware(config.train)  # QLoRA or bf16 on a CPU-only machine fails now, not after the data stages
    with entry.parent_run(config, state, nest_under) as ctx:
        # 1. the base model first: the data pre-flight counts tokens with its tokenizer and chat template;
        #    the name's champion, when it has one, is the second bar a candidate must clear
        base: Base = resolve_model.task(ctx, config.model, config.offline)
        champ = champion.find(config.name) if config.gate.vs_champion.enabled else None
        frozen = champion.frozen_items(champ, config.gate.vs_champion.rebaseline) if champ else []

        # 2-3. data: every record loaded, checked, filtered, deduplicated, split and decontaminated
        splits = prepare_data(ctx, config, base["path"])

        # 4-5. render with the chat template (the base's own, or template.chat_template), audit masks, fine-tune
        tokens: Tokens = template.task(ctx, splits["paths"], base["path"], config.template, trust_remote_code=trust)
        if champ is not None:  # before training: the champion's results must be known, or re-baselining asked for
            champion.check_cached(champ, frozen, config, tokens["paths"]["tokenizer"], ctx.stage_dir("champion"))
        trained: Trained = run_training.task(ctx, tokens["paths"], base["path"], config.train,
                                             trust_remote_code=trust)

        # 6. evaluate every model against the base (and the champion in service, on the items it was judged
        #    on): specialisation on held-out data, forgetting on benchmarks, then the promotion gate; every
        #    model carries a content digest, so results already known (the champion's) come from the cache
        models: dict[str, ModelRef] = {
            "base": {"path": base["path"], "digest": base["digest"], "tokenizer": base["path"]},
            "ft": {"path": trained["model_path"], "adapter": trained["adapter_path"], "tokenizer": base["path"],
                   "digest": model_digest(trained["model_path"], trained["adapter_path"])}}
        remember_ft(ctx.parent_run_id, models["ft"], base["path"], champ.version if champ else None)
        test_items = splits["paths"]["test"]
        if champ is not None:
            test_items = champion.evaluation_set(test_items, frozen, ctx.stage_dir("champion"))
            models[CHAMPION] = champ.spec
        held: Heldout = heldout.task(ctx, test_items, models, config.eval.heldout,
                                     system_prompt=config.template.system_prompt, trust_remote_code=trust,
                                     bootstrap_iters=config.eval.bootstrap_iters, seed=config.eval.seed,
                                     chat_tokenizer=tokens["paths"]["tokenizer"])
        bench: Benchmarks = benchmarks.task(ctx, models, config.eval, trust_remote_code=trust)
        verdict: Verdict = gate.task(ctx, [held["metrics"], bench["metrics"]], config.gate,
                                     champion=champ.describe() if champ else None)

        # 7. report
        forgetting = bench["forgetting"].get("ft", [])
        summary: Report = report.task(ctx, [held["metrics"], bench["metrics"]], forgetting, verdict=verdict)

    create_markdown_artifact(
        key="sftflow-summary",
        markdown=(f"## sftflow run `{config.name}`\n\nMLflow run: `{ctx.parent_run_id}` "
                  f"{links.mlflow_run_url(ctx.experiment_id, ctx.parent_run_id) or ''} "
                  f"(experiment `{config.tracking.experiment}`, tracking URI `{scrub(mlflow.get_tracking_uri())}`)\n\n"
                  f"Run directory: `{ctx.run_dir}`\n\n{summary['markdown']}\n"),
        description="base vs fine-tuned summary and the MLflow run of this flow run")
    if champ is not None:
        create_table_artifact(
            key="sftflow-champion", description=f"base / champion v{champ.version} / candidate, paired on the same items",
            table=[{"measure": r["measure"], "base": r["base"], f"champion v{champ.version}": r.get("champion"),
                    "candidate": r["fine-tuned"], "candidate - champion": r.get("vs_champion"),
                    "95% CI": r.get("vs_champion_ci")} for r in summary["rows"]])
    if forgetting:
        create_table_artifact(key="sftflow-forgetting", table=forgetting,
                              description="fine-tuned minus base per benchmark, category and subtask (95% CIs)")
    return {"mlflow_run_id": ctx.parent_run_id, "run_dir": ctx.run_dir, "rows": summary["rows"],
            "experiment_id": ctx.experiment_id, "gate": {"passed": verdict["passed"], "reasons": verdict["reasons"], "champion": verdict["champion"]},
            "eval_timing": summary["timing"]}
