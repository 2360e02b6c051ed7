"""Shared set-up for the training benchmarks: the demo data rendered with the real demo model.

On a shared, oversubscribed CPU run them with OMP_NUM_THREADS=1: torch's spinning OpenMP threads otherwise
make step times swing by 10x with other processes' load (measured: 3 vs 37 tok/s at load average 9).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_tokens(work: Path) -> tuple[dict, "object", str]:
    """configs/demo.yaml's data through the real load/curate/split/template stages -> (token paths, config, model).

    The model is the demo's base (pulled into the state dir like `sftflow run` does, or reused), or the folder
    named by $SFTFLOW_BENCH_MODEL."""
    from sftflow import env

    os.chdir(REPO)  # the demo config's data.root and the state dir (.sftflow) are relative to the repository
    env.configure(offline=True)
    from sftflow.configs.loader import load_config
    from sftflow.models import pull
    from sftflow.tasks.data.curate import curate
    from sftflow.tasks.data.load import load
    from sftflow.tasks.data.split import split
    from sftflow.tasks.training.template import template

    cfg = load_config(REPO / "configs" / "demo.yaml")
    model = os.environ.get("SFTFLOW_BENCH_MODEL") or str(pull(cfg.model.base))
    loaded = load(cfg.data, out_dir=work)
    curated = curate(loaded["records"], cfg.curate, out_dir=work)
    splits = split(curated["records"], cfg.split, out_dir=work)
    return template(splits["paths"], model, cfg.template, out_dir=work)["paths"], cfg, model


def step_timer():
    """Trainer callback recording each optimizer step's wall time and non-pad input tokens
    (set `.trainer` to the CountingSFTTrainer built by build_trainer)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer, self.times, self.tokens, self._t, self._n = None, [], [], 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t, self._n = time.perf_counter(), self.trainer.input_tokens

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)
            self.tokens.append(self.trainer.input_tokens - self._n)

    return StepTimer()


def median(xs):
    return statistics.median(xs)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sftflow-bench-"))
