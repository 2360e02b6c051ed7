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


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_model) -> dict:
    """One `python -m benchmarks --quick` run -> its JSON, stdout and each script's output: the harness test and the
    tests of the scripts it runs (with their quick arguments) read the same run."""
    import json

    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], env=env,
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = Path(re.search(r"work dir (\S+)", proc.stdout).group(1))
    return {"result": json.loads(out.read_text()), "stdout": proc.stdout,
            "scripts": {log.stem: log.read_text() for log in work.glob("*.log")}}


@pytest.mark.e2e
@pytest.mark.slow
def test_packing_benchmark_compares_every_batching_with_stock_trl(harness):
    out = harness["scripts"]["packing_speed"]
    for arm in ("trl_default", "padded", "padding_free", "packed", "reshuffled"):
        assert re.search(rf"^{arm}\s+[\d.]+\s+[\d.]+x", out, re.M), f"no result row for {arm}:\n{out}"
    # padding_free trains on exactly the stock trainer's batches: a whole epoch of per-step losses must agree.
    diff = float(re.search(r"per-step loss, max \|diff\|: (\S+) over (\d+) steps", out).group(1))
    assert diff < 1e-3


@pytest.mark.e2e
@pytest.mark.slow
def test_trainer_overhead_benchmark_prints_its_ratio(harness):
    out = harness["scripts"]["trainer_overhead"]
    assert re.search(r"ratio [\d.]+x \(target <= 1.15x\)", out), out


def gpu_check_row(run: str) -> re.Pattern:
    """A result row of gpu_check for the run named exactly `run`: its precision, attention, kernels, tokens/s."""
    return re.compile(rf"^{re.escape(run)}\s+(fp32|bf16|fp16)\s+\S+.*\s\d+\s+(\d+ steps|whole run)\s", re.M)


@pytest.mark.slow
def test_gpu_check_trains_each_method_and_says_what_it_ran(tmp_path, tiny_model):
    import torch

    out = run_bench("gpu_check.py", tmp_path, tiny_model, "--size", "tiny", "--steps", "3", "--warmup-steps", "1",
                    "--records", "40", "--no-tests")
    runs = ("lora", "full", "qlora", "full (FSDP, 1 process)") if torch.cuda.is_available() else ("lora", "full")
    for run in runs:
        assert gpu_check_row(run).search(out), f"no row for {run}:\n{out}"
    assert re.search(r"^(lora|full)\s.*\s2 steps\s", out, re.M), out  # 3 steps, the first one untimed
    if not torch.cuda.is_available():
        assert "no CUDA" in out and "skipped: qlora" in out and "skipped: FSDP" in out


def _gpu_check_modules():
    import sys

    sys.path.insert(0, str(BENCH))  # the benchmarks import each other as scripts do
    try:
        import gpu_check
        import gpu_metrics
    finally:
        sys.path.remove(str(BENCH))
    return gpu_check, gpu_metrics


def test_the_fsdp_row_that_gpu_check_prints_is_the_row_the_test_finds():
    gpu_check, _ = _gpu_check_modules()
    row = {"run": "full (FSDP, 1 process)", "precision": "bf16", "attention": "flash_attention_2", "kernels": "liger",
           "tokens_per_s": 12345.0, "timed": "whole run", "peak_gpu_mem_mb": 2048.0, "mfu": 0.25, "loss": 1.5}
    line = gpu_check.format_row(row)
    assert gpu_check_row("full (FSDP, 1 process)").search(line), line
    assert not gpu_check_row("full").search(line)  # a full row is not taken for the FSDP one, nor the reverse
    assert not gpu_check_row("full (FSDP, 1 process)").search(gpu_check.format_row({**row, "run": "full"}))


def test_mfu_counts_each_methods_flops_against_the_exact_cards_peak():
    _, gm = _gpu_check_modules()
    n = 1_000_000
    assert gm.flops_per_token(n, n) == 6 * n  # full fine-tuning
    assert gm.flops_per_token(n, 10_000) == 4 * n + 20_000  # LoRA/QLoRA: no weight gradients for frozen weights
    assert gm.mfu(1e6, n, n, 989.0) == pytest.approx(6e12 / 989e12)
    assert gm.mfu(1e6, n, n, None) is None
    # Exact names: the PCIe and NVL parts are slower than the SXM one their names contain.
    assert gm.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gm.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gm.peak_tflops("NVIDIA H100 NVL") == 835.0 and gm.peak_tflops("NVIDIA H200") == 989.0
    assert gm.peak_tflops("NVIDIA A10") == 125.0 and gm.peak_tflops("NVIDIA A10G") == 70.0
    assert gm.peak_tflops("Tesla T4") == 65.0  # fp16: what auto trains a T4 in
    assert gm.peak_tflops("NVIDIA H800") is None and gm.peak_tflops("NVIDIA GeForce RTX 5090") is None


def test_the_step_clock_times_only_the_steps_after_warm_up():
    from types import SimpleNamespace

    _, gm = _gpu_check_modules()
    clock, trainer = gm.StepClock(warmup=2), SimpleNamespace(input_tokens=0)
    clock.bind_trainer(trainer)
    for step in range(1, 6):
        clock.on_step_begin(None, SimpleNamespace(global_step=step - 1), None)
        trainer.input_tokens += 100 * step
        clock.on_step_end(None, SimpleNamespace(global_step=step), None)
        trainer.input_tokens += 7  # outside a step (validation does not count tokens; nothing else may)
    assert clock.steps == 3 and clock.tokens == 300 + 400 + 500
    assert clock.tokens_per_s == clock.tokens / clock.seconds


@pytest.mark.e2e
@pytest.mark.slow
def test_the_harness_runs_every_benchmark_in_quick_mode_and_writes_its_json(harness):
    """`python -m benchmarks --quick`: P1-P7 and E1 measured (smoke config, tiny model), one table, one JSON."""
    result = harness["result"]
    assert result["mode"] == "quick" and result["errors"] == [] and "CPU cores" in result["machine"]
    rows = {r["id"]: r for r in result["results"]}
    assert set(rows) == {"P1", "P2", "P3", "P4", "P5", "P6", "P7", "E1"}
    assert all(r["value"] > 0 for r in rows.values()), rows
    assert 0.05 < rows["P6"]["value"] < 8  # GiB: the tiny model's flow, Prefect server included
    assert rows["P2"]["value"] < 1.5  # the rerun finds the data, the training and the base's scores cached
    for key in rows:
        assert re.search(rf"^\| {key} \|", harness["stdout"], re.M), harness["stdout"]


@pytest.mark.slow
def test_eval_speed_benchmark_prints_every_arm_and_the_ratios(tmp_path, tiny_model):
    out = run_bench("eval_speed.py", tmp_path, tiny_model, "--mmlu", "1", "--bbh", "1", "--budget", "8")
    for arm in ("base, stock budget", "ft via peft=, stock budget (before)", "base, budget 8", "ft merged, budget 8 (now)"):
        assert re.search(rf"^{re.escape(arm)}\s+[\d.]+ s$", out, re.M), out
    assert re.search(r"ft/base before [\d.]+x, now [\d.]+x \(target <= 1.3x\)", out), out


@pytest.mark.e2e
@pytest.mark.slow
def test_cpu_precision_benchmark_prints_the_flags_the_choice_and_both_ratios(harness):
    out = harness["scripts"]["cpu_precision"]
    assert re.search(r"^CPU: .*avx512_bf16=[01] amx_bf16=[01]$", out, re.M), out
    assert re.search(r"^precision auto here: training (fp32|bf16), evaluation (float32|bfloat16) \(auto: ", out,
                     re.M), out
    for arm in ("train fp32", "train bf16 autocast", "lm-eval fp32", "lm-eval bf16"):
        assert re.search(rf"^{arm}\s+[\d.]+ (tok/s|s)", out, re.M), out
    assert re.search(r"^bf16/fp32 speed: training [\d.]+x, lm-eval [\d.]+x \(auto picks (fp32|bf16) here\)$", out,
                     re.M), out
