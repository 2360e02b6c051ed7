"""Trained (non-pad) tokens/s of sftflow's batchings vs TRL's padded default, and their loss curves.

Demo data (configs/demo.yaml), the real SmolLM2-135M-Instruct, the demo's LoRA setup, batch size 8. Arms:
  trl_default   stock `trl.SFTTrainer`, padded batches: what the target is measured against (with sftflow's
                training arguments, so TRL's default gradient checkpointing is off here as in every arm)
  padded        sftflow's trainer, padded batches (isolates what its CPU loss path alone changes)
  padding_free  sftflow, the same batches flattened into one row (per-record attention, no pad tokens)
  packed        sftflow, best-fit-decreasing rows of --pack-length tokens (--pack-rows rows a step)

1. Throughput: every arm runs --steps optimizer steps per repeat (the first is warm-up and not counted), arms
   interleaved within a repeat so load from other processes hits them alike. An arm's rate: the median over
   its measured steps of the step's non-pad tokens / the step's wall time.
2. Loss curves (skip with --no-curves): trl_default, padding_free and packed each train one whole epoch (LoRA
   dropout off, so batch shape cannot change the random masks). Printed: the mean training loss per tenth
   of the epoch, the validation loss after it, and the whole-epoch rate (all non-pad tokens / training wall
   time). padding_free sees exactly trl_default's batches, so their per-step losses are also compared; a
   `reshuffled` padding_free epoch (seed + 1) shows how far two shuffles of the same data land apart.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/packing_speed.py [--steps 5] [--repeats 3] [--no-curves]
"""

from __future__ import annotations

import argparse

from common import demo_tokens, load_average, median, step_timer, workdir

ARMS = ("trl_default", "padded", "padding_free", "packed")


def stock_trainer(paths, model_path, train_cfg, out, callbacks):
    """TRL's SFTTrainer as it comes (its padded collator and loss), on sftflow's model, data and arguments."""
    from peft import LoraConfig
    from trl import SFTTrainer

    from sftflow.models import load_tokenizer
    from sftflow.tasks.training.setup import load_model, lora_targets
    from sftflow.tasks.training.trainer import _dataset, sft_args

    class Counting(SFTTrainer):  # counts non-pad tokens as sftflow's trainer does; nothing else changes
        input_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.input_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    model = load_model(model_path, train_cfg, False)
    lora = train_cfg.lora
    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_targets(model.config.model_type, train_cfg), task_type="CAUSAL_LM")
    val = _dataset(paths["val"])
    args = sft_args(train_cfg, out, val is not None, eval_strategy="no", load_best_model_at_end=False)
    return Counting(model=model, args=args, train_dataset=_dataset(paths["train"]), eval_dataset=val,
                    processing_class=load_tokenizer(paths["tokenizer"]), peft_config=peft, callbacks=callbacks)


def build(paths, model, cfg, arm: str, out, args, **overrides):
    from sftflow.tasks.training.trainer import build_trainer

    update = {"batching": "padded" if arm == "trl_default" else arm, "logging_steps": 1, "eval_steps": None,
              "warmup_ratio": 0.0, **overrides}
    if arm == "packed":  # by default one row holds about what a padded batch of 8 holds in real tokens
        update.update(batch_size=args.pack_rows, pack_length=args.pack_length)
    train_cfg = cfg.train.model_copy(update=update)
    timer = step_timer()
    if arm == "trl_default":
        trainer = stock_trainer(paths, model, train_cfg, out, [timer])
    else:
        trainer, _ = build_trainer(paths, model, train_cfg, out, callbacks=[timer], eval_strategy="no",
                                   load_best_model_at_end=False)
    timer.trainer = trainer
    return trainer, timer


def losses_of(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def throughput(paths, model, cfg, args, work) -> dict:
    rates = {a: [] for a in ARMS}
    for r in range(args.repeats):
        for arm in ARMS:
            trainer, timer = build(paths, model, cfg, arm, work / f"{arm}-{r}", args, max_steps=args.steps)
            trainer.train()
            step_rates = [n / t for n, t in zip(timer.tokens[1:], timer.times[1:])]
            rates[arm] += step_rates
            print(f"repeat {r} {arm:12s} {median(step_rates):7.1f} tok/s  {median(timer.tokens[1:]):6.0f} "
                  f"tok/step  {median(timer.times[1:]):5.2f} s/step  losses "
                  f"{[round(x, 3) for x in losses_of(trainer)]}", flush=True)
    return {a: median(v) for a, v in rates.items()}


def deciles(losses: list[float]) -> list[float]:
    n = len(losses)
    return [sum(part) / len(part) for part in (losses[i * n // 10:(i + 1) * n // 10] for i in range(10)) if part]


def val_loss(trainer, path) -> float:
    """Token-weighted loss on the validation records, each alone: the same measure whatever the batching."""
    import torch

    from sftflow.records import read_jsonl

    model, total, count = trainer.model.eval(), 0.0, 0
    for row in read_jsonl(path):
        ids = torch.tensor([row["input_ids"]])
        labels = ids.masked_fill(torch.tensor([row["assistant_masks"]]) == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
        count += n
    return total / count


def curves(paths, model, cfg, args, work) -> dict:
    out = {}
    lora = cfg.train.lora.model_copy(update={"dropout": 0.0})
    # padding_free again on another shuffle (seed + 1): how far two runs of the same batching land apart.
    runs = (("trl_default", "trl_default", cfg.train.seed), ("padding_free", "padding_free", cfg.train.seed),
            ("packed", "packed", cfg.train.seed), ("reshuffled", "padding_free", cfg.train.seed + 1))
    for name, arm, seed in runs:
        trainer, timer = build(paths, model, cfg, arm, work / f"epoch-{name}", args, max_steps=-1, epochs=1,
                               lora=lora, seed=seed)
        trainer.train()
        val = val_loss(trainer, paths["val"])
        out[name] = {"losses": losses_of(trainer), "val": val, "rate": sum(timer.tokens) / sum(timer.times),
                     "steps": len(timer.times)}
        print(f"epoch {name:12s} {out[name]['steps']:3d} steps  {out[name]['rate']:7.1f} tok/s  val loss {val:.4f}  "
              f"loss by tenth {[round(x, 3) for x in deciles(out[name]['losses'])]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--pack-rows", type=int, default=1, help="packed rows per step")
    ap.add_argument("--no-curves", dest="curves", action="store_false")
    args = ap.parse_args()
    work = workdir()
    paths, cfg, model = demo_tokens(work)
    print(f"load average before: {load_average()}")
    rates = throughput(paths, model, cfg, args, work)
    epoch = curves(paths, model, cfg, args, work) if args.curves else {}
    print(f"\nload average after: {load_average()}")
    print(f"{'arm':12s} {'median tok/s':>12s} {'vs trl_default':>14s} {'vs padded':>9s}")
    for arm in ARMS:
        print(f"{arm:12s} {rates[arm]:12.1f} {rates[arm] / rates['trl_default']:13.2f}x "
              f"{rates[arm] / rates['padded']:8.2f}x")
    if epoch:
        base = epoch["trl_default"]
        print(f"\none epoch   {'tok/s':>7s} {'vs trl_default':>14s} {'val loss':>9s} {'max |tenth - trl|':>18s}")
        for arm, res in epoch.items():
            gap = max(abs(a - b) for a, b in zip(deciles(res["losses"]), deciles(base["losses"])))
            print(f"{arm:12s} {res['rate']:7.1f} {res['rate'] / base['rate']:13.2f}x {res['val']:9.4f} {gap:18.4f}")
        pf = epoch["padding_free"]["losses"]
        print(f"padding_free vs trl_default per-step loss, max |diff|: "
              f"{max(abs(a - b) for a, b in zip(pf, base['losses'])):.2e} over {len(pf)} steps")


if __name__ == "__main__":
    main()
