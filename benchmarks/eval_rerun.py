"""A config's first run vs an unchanged rerun, and the fine-tuned sweep vs the base sweep of the first run.

Both runs go through the real flow in one process, in a fresh state directory, so the first is cold (no
cached data, training or evaluation). Pulled base models are reused (symlinked from --models, by default the
repository's .sftflow/models), so neither run counts a model download. Targets (README): the rerun takes at
most 5% of the first run's wall time and neither trains nor evaluates; the fine-tuned model's benchmark
sweep takes at most 1.3x the base model's.

    .venv/bin/python benchmarks/eval_rerun.py [CONFIG] [--set key=value ...] [--models DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_home(models: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="sftflow-rerun-"))
    os.environ["SFTFLOW_HOME"] = str(home)  # before sftflow, Prefect or MLflow read it
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # a loaded machine is slow
    (home / "models").mkdir()
    for model in (models.iterdir() if models.is_dir() else []):
        if (model / "sftflow-model.json").is_file():
            (home / "models" / model.name).symlink_to(model.resolve())
    return home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--models", default=str(REPO / ".sftflow" / "models"))
    args = parser.parse_args()
    config = Path(args.config).resolve()
    os.chdir(REPO)  # configs name data relative to the repository
    home = fresh_home(Path(args.models).resolve())

    from mlflow.tracking import MlflowClient

    from sftflow.configs.loader import load_config
    from sftflow.flows.sft_pipeline import sft_pipeline

    cfg = load_config(config, args.overrides)
    walls, runs = [], []
    for _ in range(2):
        start = time.perf_counter()
        runs.append(sft_pipeline(config=cfg))
        walls.append(time.perf_counter() - start)
    first, again = (MlflowClient().get_run(r["mlflow_run_id"]).data.metrics for r in runs)
    evaluated = sum(v for k, v in again.items() if k.endswith("/evaluated_tasks"))
    print(f"state dir {home}, config {config} {' '.join(args.overrides)}")
    print(f"first run {walls[0]:.1f} s, unchanged rerun {walls[1]:.1f} s, "
          f"ratio {walls[1] / walls[0]:.3f} (target <= 0.05)")
    print(f"rerun: trained: {'no' if again.get('train/cache_hit') == 1 else 'yes'}, "
          f"held-out cache hit: {again.get('heldout/cache_hit', 0):.0f}, lm-eval tasks evaluated: {evaluated:.0f}")
    base, ft = first.get("eval/base/wall_s"), first.get("eval/ft/wall_s")
    if base and ft:
        print(f"first run sweeps: base {base:.1f} s, fine-tuned {ft:.1f} s, ratio {ft / base:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
