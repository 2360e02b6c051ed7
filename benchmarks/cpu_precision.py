"""fp32 vs bf16 on this CPU, in one run: training tokens/s (the demo's LoRA, bf16 autocast over fp32 weights) and
lm-eval wall time (weights in bf16), with the CPU's flags and what `precision: auto` picks on it.

CPUs with AMX-BF16 or AVX512-BF16 multiply bf16 natively, and `auto` takes bf16 there; on others (AVX2-only) bf16
is only converted, and the ratio says how much slower it would be. Training arms alternate per repeat; each arm's
first step is warm-up.

    .venv/bin/python benchmarks/cpu_precision.py [--steps 6] [--repeats 2] [--mmlu 6] [--bbh 3]
"""

from __future__ import annotations

import argparse
import os
import time

from common import REPO, demo_tokens, load_average, median, step_timer, workdir

ARMS = {"fp32": "0", "bf16": "1"}  # SFTFLOW_CPU_BF16 for the evaluation arms (training sets its precision)


def use_cpu_bf16(value: str | None) -> None:
    """This process's CPU taken as one with (1) or without (0) bf16 instructions; None: as the hardware says."""
    if value is None:
        os.environ.pop("SFTFLOW_CPU_BF16", None)
    else:
        os.environ["SFTFLOW_CPU_BF16"] = value


def train_rate(paths: dict, model: str, cfg, prec: str, steps: int, out) -> float:
    """Median non-pad tokens/s of optimizer steps 2..steps (step 1 is warm-up)."""
    from sftflow.tasks.training.trainer import build_trainer

    train_cfg = cfg.train.model_copy(update={"max_steps": steps, "logging_steps": steps, "warmup_ratio": 0.0,
                                              "eval_steps": None, "precision": prec})
    timer = step_timer()
    trainer, params = build_trainer(paths, model, train_cfg, out, callbacks=[timer], eval_strategy="no",
                                    load_best_model_at_end=False, save_strategy="no")
    assert params["train.precision_resolved"] == prec
    timer.trainer = trainer
    trainer.train()
    return median([n / t for n, t in zip(timer.tokens[1:], timer.times[1:])])


def eval_wall(model: str, cfg, tasks: list[str], include, arm: str) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from sftflow import precision
    from sftflow.tasks.evaluation.lmeval import lm_eval_model

    use_cpu_bf16(ARMS[arm])
    assert precision.inference() == ("bfloat16" if arm == "bf16" else "float32")
    lm = lm_eval_model({"path": model, "tokenizer": model}, cfg, False)
    start = time.perf_counter()
    simple_evaluate(model=lm, tasks=tasks, bootstrap_iters=0,
                    task_manager=TaskManager(include_path=str(include), include_defaults=False))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mmlu", type=int, default=6, help="MMLU subjects (the demo's items each, 0-shot)")
    ap.add_argument("--bbh", type=int, default=3, help="BBH subtasks (the demo's items each, 3-shot)")
    args = ap.parse_args()
    work = workdir()
    paths, cfg, model = demo_tokens(work)
    import torch

    from sftflow import precision
    from sftflow.tasks.evaluation.mirror import sweep_tasks
    from sftflow.tasks.evaluation.catalog import BENCHMARKS

    use_cpu_bf16(None)
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = " ".join(f"{k}={int(bool(caps.get(k)))}" for k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16"))
    card = precision.current_card()
    print(f"CPU: {caps.get('cpu_name', '?')}, {os.cpu_count()} cores; {flags}")
    print(f"precision auto here: training {precision.training()}, evaluation {precision.inference()} "
          f"({precision.training_reason()})")
    if not card.bf16:
        print("this CPU has no bf16 instructions: bf16 is converted, not multiplied natively; the ratios below say "
              "what it would cost")
    print(f"load average before: {load_average()}", flush=True)

    rates = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        for arm in ARMS:
            rates[arm].append(train_rate(paths, model, cfg, arm, args.steps, work / f"train-{arm}-{r}"))
            print(f"repeat {r}: train {arm} {rates[arm][-1]:.1f} tok/s", flush=True)

    subsets = {"mmlu": BENCHMARKS["mmlu"].stock_subtasks()[:args.mmlu], "bbh": BENCHMARKS["bbh"].stock_subtasks()[:args.bbh]}
    eval_cfg = cfg.eval.model_copy(update={b: getattr(cfg.eval, b).model_copy(update={"subtasks": s})
                                           for b, s in subsets.items()}, deep=True)
    tasks = [t.name for t in sweep_tasks(eval_cfg, work / "tasks")]
    walls = {arm: eval_wall(model, eval_cfg, tasks, work / "tasks", arm) for arm in ARMS}
    use_cpu_bf16(None)
    train = {arm: median(v) for arm, v in rates.items()}
    print(f"\nload average after: {load_average()}")
    print(f"{'train fp32':24s} {train['fp32']:8.1f} tok/s")
    print(f"{'train bf16 autocast':24s} {train['bf16']:8.1f} tok/s")
    print(f"{'lm-eval fp32':24s} {walls['fp32']:8.1f} s  ({len(subsets['mmlu'])} MMLU subjects, "
          f"{len(subsets['bbh'])} BBH subtasks)")
    print(f"{'lm-eval bf16':24s} {walls['bf16']:8.1f} s")
    print(f"bf16/fp32 speed: training {train['bf16'] / train['fp32']:.2f}x, lm-eval "
          f"{walls['fp32'] / walls['bf16']:.2f}x (auto picks {precision.training()} here)")


if __name__ == "__main__":
    main()
