"""One arm of the orchestration benchmarks, in its own process (the harness times the process and its tree's RSS).

  flow    the pipeline as `sftflow run` runs it: the Prefect flow (ephemeral server) with MLflow (SQLite) tracking
  direct  the same stage functions, same order and inputs, called directly: no Prefect, no MLflow

Writes `{"metrics": {...}}` (the benchmark stage's metrics) to --out. The state dir is $SFTFLOW_HOME.

    .venv/bin/python benchmarks/pipeline_arms.py {flow,direct} CONFIG --out result.json [--work DIR]
    .venv/bin/python benchmarks/pipeline_arms.py pull MODEL --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_flow(cfg, work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from sftflow.flows.sft_pipeline import sft_pipeline

    result = sft_pipeline(config=cfg)
    return {"metrics": MlflowClient().get_run(result["mlflow_run_id"]).data.metrics, "run_dir": result["run_dir"]}


def run_direct(cfg, work: Path) -> dict:
    """flows/sft_pipeline.py's stages as plain function calls (keep in step with it)."""
    from sftflow.tasks.data.curate import curate
    from sftflow.tasks.data.decontam import targets
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

    def out(stage: str) -> Path:
        (work / stage).mkdir(parents=True, exist_ok=True)
        return work / stage

    trust = cfg.model.trust_remote_code
    check_hardware(cfg.train)
    base = resolve_model(cfg.model, cfg.offline, out_dir=out("model"))
    loaded = load(cfg.data, out_dir=out("load"), policy=cfg.curate)
    curated = curate(loaded["records"], cfg.curate, out_dir=out("curate"), tokenizer=base["path"],
                     max_length=cfg.template.max_length, system_prompt=cfg.template.system_prompt,
                     load_rejects=loaded["rejects"])
    splits = split(curated["records"], cfg.split, out_dir=out("split"),
                   upstream={"load": loaded["ledger"], "curate": curated["ledger"]},
                   benchmarks=targets(cfg.eval), benchmark_root=cfg.eval.benchmark_root)
    tokens = template(splits["paths"], base["path"], cfg.template, out_dir=out("template"), trust_remote_code=trust)
    trained = run_training(tokens["paths"], base["path"], cfg.train, out_dir=out("train"), trust_remote_code=trust)
    models = {"base": {"path": base["path"], "digest": base["digest"], "tokenizer": base["path"]},
              "ft": {"path": trained["model_path"], "adapter": trained["adapter_path"], "tokenizer": base["path"]}}
    held = heldout(splits["paths"]["test"], models, cfg.eval.heldout, out_dir=out("heldout"),
                   system_prompt=cfg.template.system_prompt, trust_remote_code=trust,
                   bootstrap_iters=cfg.eval.bootstrap_iters, seed=cfg.eval.seed,
                   chat_tokenizer=tokens["paths"]["tokenizer"])
    bench = benchmarks(models, cfg.eval, out_dir=out("benchmarks"), trust_remote_code=trust)
    verdict = gate([held["metrics"], bench["metrics"]], cfg.gate, out_dir=out("gate"))
    report([held["metrics"], bench["metrics"]], bench["forgetting"].get("ft", []), out_dir=out("report"),
           verdict=verdict)
    return {"metrics": bench["metrics"], "run_dir": str(work)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arm", choices=("flow", "direct", "pull"))
    ap.add_argument("target", help="config YAML (flow, direct) or model alias (pull)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", help="direct: the folder of the stage outputs")
    args = ap.parse_args()
    os.chdir(REPO)  # configs' relative paths (data.root) as `sftflow run` from the repository sees them
    from sftflow import env

    state = env.configure(offline=True)
    if args.arm == "pull":
        from sftflow.models import pull

        result = {"path": str(pull(args.target))}
    else:
        from sftflow.configs.loader import load_config

        cfg = load_config(Path(args.target), args.overrides)
        work = Path(args.work or state / "direct")
        result = (run_flow if args.arm == "flow" else run_direct)(cfg, work)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
