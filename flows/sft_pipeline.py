"""The SFT recipe: load -> curate -> split -> model -> template -> train -> evaluate -> report.

Each step is a Prefect task wrapping a plain function in tasks/; each runs in its own child MLflow
run under one parent run per flow run, and writes into this flow run's own directory.
"""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftflow import env
from sftflow.configs.schema import PipelineConfig
from sftflow.tasks.benchmarks import benchmarks_task
from sftflow.tasks.curate import curate_task
from sftflow.tasks.heldout import heldout_task
from sftflow.tasks.load import load_task
from sftflow.tasks.model import model_task
from sftflow.tasks.report import report_task
from sftflow.tasks.split import split_task
from sftflow.tasks.template import template_task
from sftflow.tasks.train import check_hardware, train_task
from sftflow.tracking import parent_run


@flow(name="sft-pipeline")
def sft_pipeline(config: PipelineConfig) -> dict:
    state = env.configure(config.offline)
    trust = config.model.trust_remote_code
    check_hardware(config.train)  # QLoRA or bf16 on a CPU-only machine fails now, not after the data stages
    with parent_run(config, state, str(flow_run.id), flow_run.name) as ctx:
        # 1-3. data: every record loaded, curated and split, with counts and manifests
        loaded = load_task(ctx, config.data)
        curated = curate_task(ctx, loaded["records"], config.curate)
        splits = split_task(ctx, curated["records"], config.split)

        # 4-5. the model: resolve the base, render with its chat template, fine-tune
        base = model_task(ctx, config.model, config.offline)
        tokens = template_task(ctx, splits["paths"], base["path"], config.template, trust_remote_code=trust)
        trained = train_task(ctx, tokens["paths"], base["path"], config.train, trust_remote_code=trust)

        # 6. evaluate base and fine-tuned: specialisation on held-out data, forgetting on benchmarks
        models = {"base": {"path": base["path"]},
                  "ft": {"path": trained["model_path"], "adapter": trained["adapter_path"]}}
        held = heldout_task(ctx, splits["paths"]["test"], models, config.eval.heldout,
                            system_prompt=config.template.system_prompt, trust_remote_code=trust)
        bench = benchmarks_task(ctx, models, config.eval, config.data.root, trust_remote_code=trust)

        # 7. report
        summary = report_task(ctx, [held["metrics"], bench["metrics"]])

    create_markdown_artifact(
        key="sftflow-summary",
        markdown=(f"## sftflow run `{config.name}`\n\nMLflow run: `{ctx.parent_run_id}` "
                  f"(experiment `{config.tracking.experiment}`, tracking URI `{mlflow.get_tracking_uri()}`)\n\n"
                  f"Run directory: `{ctx.run_dir}`\n\n{summary['markdown']}\n"),
        description="base vs fine-tuned summary and the MLflow run of this flow run")
    return {"mlflow_run_id": ctx.parent_run_id, "run_dir": ctx.run_dir, "rows": summary["rows"],
            "experiment_id": ctx.experiment_id}
