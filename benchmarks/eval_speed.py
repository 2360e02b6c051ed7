"""Benchmark sweep time of a LoRA model vs its base: lm-eval's `peft=` route with the stock generation budget
(how the fine-tuned model used to be evaluated) vs the adapter merged in memory with the configured budget.

The model is the demo's base (SmolLM2-135M-Instruct, or $SFTFLOW_BENCH_MODEL) with a LoRA of the demo's shape
(r=8 on q/k/v/o) whose B matrices are small random values: it costs what a trained adapter costs per forward
pass, but it generates like the base, so the effect of a fine-tuned model's own answer lengths is not in it.
Arms run one after another on the same tasks (MMLU subjects 0-shot and BBH subtasks 3-shot from the demo's
eval settings, fewer of them); prints each arm's wall time and the ratios.

    .venv/bin/python benchmarks/eval_speed.py [--mmlu 8] [--bbh 6] [--budget 64]
"""

from __future__ import annotations

import argparse
import os
import time

from common import REPO, load_average, workdir


def lora_adapter(base: str, folder) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from sftflow.models import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(base), LoraConfig(r=8, lora_alpha=16,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    model.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mmlu", type=int, default=8, help="MMLU subjects (5 items each, 0-shot)")
    parser.add_argument("--bbh", type=int, default=6, help="BBH subtasks (3 items each, 3-shot)")
    parser.add_argument("--budget", type=int, default=64, help="eval.bbh.max_gen_toks of the new arms")
    args = parser.parse_args()
    os.chdir(REPO)
    from sftflow import env

    env.configure(offline=True)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from sftflow.configs.loader import load_config
    from sftflow.models import pull
    from sftflow.tasks.evaluation.lmeval import lm_eval_model
    from sftflow.tasks.evaluation.mirror import sweep_tasks
    from sftflow.tasks.evaluation.catalog import BENCHMARKS

    cfg = load_config(REPO / "configs" / "demo.yaml").eval
    base = os.environ.get("SFTFLOW_BENCH_MODEL") or str(pull(load_config(REPO / "configs" / "demo.yaml").model.base))
    work = workdir()
    adapter = lora_adapter(base, work / "adapter")
    subsets = {"mmlu": BENCHMARKS["mmlu"].stock_subtasks()[:args.mmlu], "bbh": BENCHMARKS["bbh"].stock_subtasks()[:args.bbh]}
    stock_cfg = cfg.model_copy(update={b: getattr(cfg, b).model_copy(update={"subtasks": s, "max_gen_toks": None})
                                       for b, s in subsets.items()}, deep=True)
    budget_cfg = stock_cfg.model_copy(update={"bbh": stock_cfg.bbh.model_copy(update={"max_gen_toks": args.budget})})
    mirrors = {"stock": (stock_cfg, work / "stock"), "budget": (budget_cfg, work / "budget")}
    tasks = {k: [t.name for t in sweep_tasks(c, folder)] for k, (c, folder) in mirrors.items()}

    def sweep(lm, mirror: str) -> float:
        start = time.perf_counter()
        simple_evaluate(model=lm, tasks=tasks[mirror], bootstrap_iters=0,
                        task_manager=TaskManager(include_path=str(mirrors[mirror][1]), include_defaults=False))
        return time.perf_counter() - start

    base_ref, ft_ref = {"path": base, "tokenizer": base}, {"path": base, "adapter": adapter, "tokenizer": base}
    unmerged = HFLM(pretrained=base, peft=adapter, tokenizer=base, batch_size=cfg.batch_size, device="cpu",
                    dtype="float32")
    arms = {"base, stock budget": sweep(lm_eval_model(base_ref, cfg, False), "stock"),
            "ft via peft=, stock budget (before)": sweep(unmerged, "stock"),
            f"base, budget {args.budget}": sweep(lm_eval_model(base_ref, cfg, False), "budget"),
            f"ft merged, budget {args.budget} (now)": sweep(lm_eval_model(ft_ref, cfg, False), "budget")}
    print(f"{len(subsets['mmlu'])} MMLU subjects x {cfg.mmlu.limit}, {len(subsets['bbh'])} BBH subtasks x "
          f"{cfg.bbh.limit}; load average {load_average()}")
    for arm, wall in arms.items():
        print(f"{arm:40s} {wall:7.1f} s")
    walls = list(arms.values())
    print(f"ft/base before {walls[1] / walls[0]:.2f}x, now {walls[3] / walls[2]:.2f}x (target <= 1.3x); "
          f"ft now vs before {walls[3] / walls[1]:.2f}x")


if __name__ == "__main__":
    main()
