"""Trained (non-pad) tokens/s: packed and padding-free batching vs TRL's padded default.

Demo data (configs/demo.yaml), the real SmolLM2-135M-Instruct, the demo's LoRA setup. Each arm runs a
few optimizer steps per repeat (the first step is warm-up and not counted); arms are interleaved within
a repeat so machine load hits them alike. Throughput of an arm: the median over its measured steps (all
repeats) of the step's non-pad tokens / the step's wall time; the median resists bursts of load from other
processes on a shared machine. Loss curves: padding-free sees exactly the
padded arm's batches, so its per-step losses match (up to
LoRA-dropout masks, which depend on the batch shape); packed rows hold different record groups, so its
mean loss is compared.

    .venv/bin/python benchmarks/packing_speed.py [--steps 4] [--repeats 3] [--pack-length 1024 --pack-rows 1]
"""

from __future__ import annotations

import argparse

from common import DEMO_MODEL, demo_tokens, load_average, median, step_timer, workdir


def run_arm(paths, cfg, batching: str, steps: int, out, pack_length: int = 1024, pack_rows: int = 1):
    from sftflow.tasks.train import build_trainer

    overrides = {"batching": batching, "max_steps": steps, "logging_steps": 1, "eval_steps": None,
                 "warmup_ratio": 0.0}
    if batching == "packed":
        # By default one row holds about as many tokens as a padded batch of 8 holds real tokens.
        overrides.update(batch_size=pack_rows, pack_length=pack_length)
    train_cfg = cfg.train.model_copy(update=overrides)
    timer = step_timer()
    trainer, _ = build_trainer(paths, DEMO_MODEL, train_cfg, out, callbacks=[timer], eval_strategy="no")
    timer.trainer = trainer
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rates = [n / t for n, t in zip(timer.tokens[1:], timer.times[1:])]
    return {"rates": rates, "tokens_per_step": median(timer.tokens[1:]), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--pack-rows", type=int, default=1, help="packed rows per step")
    args = ap.parse_args()
    work = workdir()
    paths, cfg = demo_tokens(work)
    arms = ("padded", "padding_free", "packed")
    results = {a: [] for a in arms}
    print(f"load average before: {load_average()}")
    for r in range(args.repeats):
        for arm in arms:
            res = run_arm(paths, cfg, arm, args.steps, work / f"{arm}-{r}", args.pack_length, args.pack_rows)
            results[arm].append(res)
            print(f"repeat {r} {arm:13s} {median(res['rates']):7.1f} tok/s  {res['tokens_per_step']:6.0f} tok/step  "
                  f"losses {[round(x, 3) for x in res['losses']]}", flush=True)
    def arm_median(arm):
        return median([rate for res in results[arm] for rate in res["rates"]])

    base = arm_median("padded")
    print(f"\nload average after: {load_average()}")
    print(f"{'arm':13s} {'median tok/s':>12s} {'vs padded':>9s}  mean loss (first repeat)")
    for arm in arms:
        med = arm_median(arm)
        losses = results[arm][0]["losses"]
        print(f"{arm:13s} {med:12.1f} {med / base:8.2f}x  {sum(losses) / len(losses):.4f}")
    pf, pad = results["padding_free"][0]["losses"], results["padded"][0]["losses"]
    print(f"padding_free vs padded per-step loss max |diff|: {max(abs(a - b) for a, b in zip(pf, pad)):.2e}")


if __name__ == "__main__":
    main()
