"""One command that shows whether training works, and how fast, on this machine's GPU.

    python benchmarks/gpu_check.py [--steps 40] [--warmup-steps 5] [--model PATH] [--json OUT]

Trains LoRA, full and QLoRA for --steps steps through the pipeline's own `train()` (padding-free batches, the
precision, attention and kernels `auto` picks), then a single-process FSDP run with configs/accelerate/fsdp.yaml,
then runs the CUDA-relevant tests. Per run it prints precision, attention kernel, fused kernels, tokens/s over the
optimizer steps after --warmup-steps (validation, checkpoint saves and the best model's reload excluded; the FSDP
run, in worker processes, reports its whole run instead), peak GPU memory of that run alone, and MFU: model FLOPs
per token (6N for full fine-tuning, 4N + 2 x trainable for adapters) x tokens/s over the card's dense peak
(gpu_metrics.PEAK_TFLOPS by exact device name; --peak-tflops for any other card). docs/GPU.md has the formulas
and the table's source. The model is --model (a folder with safetensors and a tokenizer), else on CUDA the demo's
base when `sftflow model pull` has put it on disk, else a random Llama built on the spot (about 110M parameters
with grouped-query attention; `--size tiny` for the test model).

Without CUDA it is a smoke run: LoRA and full for a few steps in fp32 on the tiny model, QLoRA, FSDP and the
tests reported as skipped, and a "no CUDA" line; its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, workdir
from gpu_metrics import StepClock, mfu, peak_tflops

SIZES = {"tiny": {}, "small": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4}}
DEMO_BASE = "smollm2-135m-instruct"  # configs/demo.yaml's model.base
TESTS = ["tests/test_train.py", "tests/test_packing.py", "tests/test_template.py", "tests/test_precision.py",
         "tests/test_devices.py"]
WORDS = ("the film was great awful plot acting music scene review product broke day terrible wonderful "
         "question answer classify sentiment positive negative story ending character").split()


def records(n: int, seed: int = 0) -> list[dict]:
    """Chat records of varied length (a few to a few hundred words), so padding-free rows hold mixed records."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 300)))
        label = rng.choice(["POS", "NEG"])
        out.append({"id": f"g{i:05d}", "messages": [{"role": "user", "content": f"Review: {text}"},
                                                      {"role": "assistant", "content": label}],
                    "label": label, "source": "gpu_check", "file": "gpu_check", "index": i + 1, "meta": {}})
    return out


def model_path(args, work: Path, cuda: bool) -> str:
    """--model; else on CUDA the demo's base if `sftflow model pull` put it on disk; else a model built here."""
    from sftflow.models import models_dir
    from sftflow.tiny import build_tiny_llama

    pulled = models_dir() / DEMO_BASE
    if args.model or (cuda and args.size is None and (pulled / "config.json").exists()):
        return args.model or str(pulled)
    args.size = args.size or ("small" if cuda else "tiny")
    return str(build_tiny_llama(work / f"model-{args.size}", **SIZES[args.size]))


def tokens(model: str, work: Path, n: int) -> dict:
    from sftflow.configs.schema import TemplateConfig
    from sftflow.records import write_jsonl
    from sftflow.tasks.training.template import template

    recs = records(n)
    write_jsonl(work / "train.jsonl", recs[: n - 16])
    write_jsonl(work / "val.jsonl", recs[n - 16:])
    return template({"train": str(work / "train.jsonl"), "val": str(work / "val.jsonl")}, model,
                    TemplateConfig(max_length=2048), out_dir=work / "tokens")["paths"]


def card_peak(override: float | None) -> tuple[float | None, str]:
    """--peak-tflops, else the table's figure for this card -> (peak or None, what to print)."""
    import torch

    if override:
        return override, f"peak {override:g} TFLOP/s (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "no peak (no CUDA)"
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    if peak is None:
        return None, f"no MFU: {name!r} is not in gpu_metrics.PEAK_TFLOPS; pass --peak-tflops (its dense peak)"
    return peak, f"peak {peak:g} TFLOP/s (dense, {name})"


def train_once(method: str, paths: dict, model: str, work: Path, args, launcher: dict | None = None) -> dict:
    """One training through the pipeline's own stage function (or its accelerate launcher) -> a result row."""
    import torch

    from sftflow import hooks
    from sftflow.configs.training import TrainConfig
    from sftflow.tasks.training import launch

    cfg = TrainConfig(method=method, max_steps=args.steps, batch_size=args.batch_size, logging_steps=args.steps,
                      learning_rate=1e-4, warmup_ratio=0.0, launcher=launcher or {})
    out = work / f"run-{method}{'-fsdp' if launcher else ''}"
    if torch.cuda.is_available():  # this run's peak, not the largest of the runs before it in this process
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(warmup=args.warmup_steps)
    started = time.perf_counter()
    # The clock reaches a trainer in this process only; accelerate workers report their whole run.
    hook = hooks.train_callbacks.set((clock,))
    try:
        result = launch.launch({"token_paths": paths, "model_path": model, "out_dir": str(out),
                                "trust_remote_code": False}, cfg)
    finally:
        hooks.train_callbacks.reset(hook)
    m, p = result["metrics"], result["params"]
    timed = clock.tokens_per_s is not None
    return {"run": f"{method}{' (FSDP, 1 process)' if launcher else ''}", "precision": p["train.precision_resolved"],
            "attention": p["train.attention"], "kernels": p["train.kernels_resolved"], "steps": m["train/steps"],
            "tokens_per_s": clock.tokens_per_s if timed else m["train/tokens_per_s"],
            "timed": f"{clock.steps} steps" if timed else "whole run", "params": m["train/total_params"],
            "trainable_params": m["train/trainable_params"], "peak_gpu_mem_mb": m.get("train/peak_gpu_mem_mb"),
            "loss": m["train/final_loss"], "wall_s": time.perf_counter() - started}


HEADER = (f"{'run':<24} {'precision':<9} {'attention':<36} {'kernels':<7} {'tokens/s':>10} {'timed':<10} "
          f"{'peak MiB':>9} {'MFU':>6} {'loss':>7}")


def format_row(r: dict) -> str:
    """One run's line under HEADER, fixed-width: the run's name ('full (FSDP, 1 process)') may hold spaces."""
    mem = f"{r['peak_gpu_mem_mb']:.0f}" if r["peak_gpu_mem_mb"] is not None else "-"
    util = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    return (f"{r['run']:<24} {r['precision']:<9} {r['attention']:<36} {r['kernels']:<7} {r['tokens_per_s']:>10.0f} "
            f"{r['timed']:<10} {mem:>9} {util:>6} {r['loss']:>7.3f}")


def run_tests() -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return f"{'ok' if proc.returncode == 0 else 'FAILED'}: {lines[-1] if lines else proc.stderr[-500:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--records", type=int, default=800)
    ap.add_argument("--model", help="a real model folder (safetensors + tokenizer); default: one built here")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="built model: small (GPU) or tiny (CPU)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps left out of tokens/s")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense peak (bf16; fp16 before Ampere), for MFU")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from sftflow import env

    os.chdir(REPO)  # the state dir (.sftflow: pulled models) is the project's, wherever this is started from
    env.configure(offline=True)
    import torch

    cuda = torch.cuda.is_available()
    work = workdir()
    if not cuda:
        args.steps, args.records, args.batch_size = min(args.steps, 3), min(args.records, 48), min(args.batch_size, 4)
    args.warmup_steps = max(0, min(args.warmup_steps, args.steps - 1))  # at least one step is timed
    device = torch.cuda.get_device_name() if cuda else "no CUDA: CPU smoke run, numbers say nothing about GPUs"
    print(f"device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    model = model_path(args, work, cuda)
    paths = tokens(model, work, args.records)
    peak, peak_note = card_peak(args.peak_tflops)

    rows, skipped = [], []
    for method in ("lora", "full", "qlora"):
        if method == "qlora" and not cuda:
            skipped.append("qlora (needs CUDA and bitsandbytes)")
            continue
        rows.append(train_once(method, paths, model, work, args))
    if cuda:
        fsdp = {"kind": "accelerate", "num_processes": 1, "config_file": str(REPO / "configs/accelerate/fsdp.yaml")}
        rows.append(train_once("full", paths, model, work, args, launcher=fsdp))
    else:
        skipped.append("FSDP (configs/accelerate/fsdp.yaml needs CUDA)")
    for r in rows:
        r["mfu"] = mfu(r["tokens_per_s"], r["params"], r["trainable_params"], peak)

    print(f"model: {model} ({rows[0]['params'] / 1e6:.1f}M parameters); {args.steps} steps of batch {args.batch_size}"
          f", {args.warmup_steps} warm-up steps untimed; {peak_note}")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    for s in skipped:
        print(f"skipped: {s}")
    tests = "skipped (--no-tests)" if args.no_tests else run_tests() if cuda else "skipped (no CUDA)"
    print(f"CUDA-relevant tests ({' '.join(TESTS)}): {tests}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows,
                                         "skipped": skipped, "tests": tests}, indent=2))


if __name__ == "__main__":
    main()
