"""The training benchmarks (benchmarks/*.py) run end to end (on the tiny model, a few steps) and print what they
promise.

Their numbers are only meaningful on the real model (see README); this keeps the scripts from rotting.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(script: str, tmp_path, tiny_model, *args) -> str:
    env = {**os.environ, "SFTFLOW_BENCH_MODEL": tiny_model, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], env=env, cwd=BENCH, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_packing_benchmark_compares_every_batching_with_stock_trl(tmp_path, tiny_model):
    out = run_bench("packing_speed.py", tmp_path, tiny_model, "--steps", "2", "--repeats", "1", "--pack-length",
                    "512")
    for arm in ("trl_default", "padded", "padding_free", "packed", "reshuffled"):
        assert re.search(rf"^{arm}\s+[\d.]+\s+[\d.]+x", out, re.M), f"no result row for {arm}:\n{out}"
    # padding_free trains on exactly the stock trainer's batches: a whole epoch of per-step losses must agree.
    diff = float(re.search(r"per-step loss, max \|diff\|: (\S+) over (\d+) steps", out).group(1))
    assert diff < 1e-3


def test_trainer_overhead_benchmark_prints_its_ratio(tmp_path, tiny_model):
    out = run_bench("trainer_overhead.py", tmp_path, tiny_model, "--steps", "2", "--repeats", "1")
    assert re.search(r"ratio [\d.]+x \(target <= 1.15x\)", out), out


def test_gpu_check_trains_each_method_and_says_what_it_ran(tmp_path, tiny_model):
    import torch

    out = run_bench("gpu_check.py", tmp_path, tiny_model, "--size", "tiny", "--steps", "2", "--records", "40",
                    "--no-tests")
    methods = ("lora", "full", "qlora", r"full \(FSDP") if torch.cuda.is_available() else ("lora", "full")
    for method in methods:
        assert re.search(rf"^{method}\S*\s+(fp32|bf16|fp16)\s+\S+", out, re.M), f"no row for {method}:\n{out}"
    if not torch.cuda.is_available():
        assert "no CUDA" in out and "skipped: qlora" in out and "skipped: FSDP" in out


@pytest.mark.e2e
@pytest.mark.slow
def test_the_harness_runs_every_benchmark_in_quick_mode_and_writes_its_json(tmp_path, tiny_model):
    """`python -m benchmarks --quick`: P1-P6 and E1 measured (smoke config, tiny model), one table, one JSON."""
    import json

    out = tmp_path / "bench.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], env=env,
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["errors"] == [] and "CPU cores" in result["machine"]
    rows = {r["id"]: r for r in result["results"]}
    assert set(rows) == {"P1", "P2", "P3", "P4", "P5", "P6", "E1"}
    assert all(r["value"] > 0 for r in rows.values()), rows
    assert 0.05 < rows["P6"]["value"] < 8  # GiB: the tiny model's flow, Prefect server included
    assert rows["P2"]["value"] < 1.5  # the rerun finds the data, the training and the base's scores cached
    for key in rows:
        assert re.search(rf"^\| {key} \|", proc.stdout, re.M), proc.stdout


def test_eval_speed_benchmark_prints_every_arm_and_the_ratios(tmp_path, tiny_model):
    out = run_bench("eval_speed.py", tmp_path, tiny_model, "--mmlu", "1", "--bbh", "1", "--budget", "8")
    for arm in ("base, stock budget", "ft via peft=, stock budget (before)", "base, budget 8", "ft merged, budget 8 (now)"):
        assert re.search(rf"^{re.escape(arm)}\s+[\d.]+ s$", out, re.M), out
    assert re.search(r"ft/base before [\d.]+x, now [\d.]+x \(target <= 1.3x\)", out), out
