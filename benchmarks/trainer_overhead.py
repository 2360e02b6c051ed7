"""One SFTTrainer optimizer step vs a bare PyTorch loop doing the same forward/backward/clip/step.

Same model (the demo's LoRA on SmolLM2-135M-Instruct), same batch (the first 8 demo training records, as
the demo's batching collates them), same forward (logits of the trained positions only), same optimizer
(AdamW, torch implementation). Steps alternate between arms; the first step of each arm is warm-up. Prints
the median step time of each and the ratio.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from common import demo_tokens, load_average, median, step_timer, workdir


def trainer_steps(paths, model, cfg, steps, out):
    from sftflow.tasks.training.trainer import build_trainer

    train_cfg = cfg.train.model_copy(update={"max_steps": steps, "logging_steps": 1, "warmup_ratio": 0.0,
                                              "eval_steps": None})
    timer = step_timer()
    trainer, _ = build_trainer(paths, model, train_cfg, out, callbacks=[timer], eval_strategy="no",
                               load_best_model_at_end=False)
    timer.trainer = trainer
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    return timer.times[1:], trainer, batch


def bare_steps(trainer, batch, steps, lr):
    import torch

    from sftflow.tasks.training.trainer import projected_loss, trained_positions

    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        # The forward sftflow's trainer makes on CPU: logits of the trained positions only.
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False,
                    logits_to_keep=trained_positions(batch["labels"]))
        loss = projected_loss(out, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = workdir()
    paths, cfg, model = demo_tokens(work)
    # A dataset of exactly one batch: every trainer step sees the same 8 records.
    from sftflow.records import read_jsonl, write_jsonl

    rows = list(read_jsonl(paths["train"]))[: cfg.train.batch_size]
    write_jsonl(work / "one_batch.jsonl", rows)
    paths = {**paths, "train": str(work / "one_batch.jsonl")}
    print(f"load average before: {load_average()}")
    trainer_t, bare_t = [], []
    for r in range(args.repeats):
        t, trainer, batch = trainer_steps(paths, model, cfg, args.steps, work / f"t{r}")
        b = bare_steps(trainer, batch, args.steps, cfg.train.learning_rate)
        trainer_t.append(median(t))
        bare_t.append(median(b))
        print(f"repeat {r}: trainer {median(t):.2f} s/step  bare {median(b):.2f} s/step  "
              f"(batch {tuple(batch['input_ids'].shape)})", flush=True)
    mt, mb = median(trainer_t), median(bare_t)
    print(f"\nload average after: {load_average()}")
    print(f"median step: trainer {mt:.2f} s, bare loop {mb:.2f} s, ratio {mt / mb:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
