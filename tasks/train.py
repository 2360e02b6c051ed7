"""Stage 5: supervised fine-tuning with TRL's SFTTrainer (LoRA by default, full fine-tuning selectable).

Input is the template stage's pre-tokenized rows (input_ids + assistant_masks); TRL turns the masks
into labels. Precision follows the hardware: bf16 where a GPU supports it, float32 on CPU.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from sftflow.checkpoints import run_trainer, schedule_args
from sftflow.configs.schema import TrainConfig
from sftflow.models import load_causal_lm, load_tokenizer
from sftflow.records import read_jsonl


def _dataset(path: str):
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]} for r in read_jsonl(Path(path))]
    return Dataset.from_list(rows) if rows else None


def _peft_config(cfg: TrainConfig):
    from peft import LoraConfig

    if cfg.method != "lora":
        return None
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def sft_args(cfg: TrainConfig, output_dir: Path, has_eval: bool):
    import torch
    from trl import SFTConfig

    gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        **schedule_args(cfg, has_eval),  # validation, checkpoints, best model (sftflow.checkpoints)
        report_to="none",  # metrics go to the stage's MLflow run through MlflowStepLogger
        seed=cfg.seed,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        max_length=None,  # lengths were enforced (and counted) by the template stage
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )


def _step_logger():
    import mlflow
    from transformers import TrainerCallback

    class MlflowStepLogger(TrainerCallback):
        """Trainer logs -> step metrics of the active (train stage) MLflow run, named train/<key>."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            numeric = {f"train/{k}": float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                mlflow.log_metrics(numeric, step=state.global_step)

    return MlflowStepLogger()


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, ax in (("loss", axes[0]), ("eval_loss", axes[0]), ("learning_rate", axes[1])):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend()
    axes[1].set_xlabel("step"), axes[1].set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(token_paths: dict, model_path: str, cfg: TrainConfig, out_dir: Path,
          trust_remote_code: bool = False) -> dict:
    import torch
    from trl import SFTTrainer

    train_ds, val_ds = _dataset(token_paths["train"]), _dataset(token_paths["val"])
    tok = load_tokenizer(model_path, trust_remote_code)
    model = load_causal_lm(model_path, trust_remote_code)
    trainer = SFTTrainer(model=model, args=sft_args(cfg, out_dir / "checkpoints", val_ds is not None),
                         train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
                         peft_config=_peft_config(cfg), callbacks=[_step_logger()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())

    start = time.perf_counter()
    result = run_trainer(trainer, cfg)  # resumes from out_dir/checkpoints; early stopping
    wall = time.perf_counter() - start
    final_eval = trainer.evaluate() if val_ds is not None else {}

    kind = "adapter" if cfg.method == "lora" else "model"
    save_dir = out_dir / kind
    trainer.save_model(str(save_dir))  # safetensors: adapter_model.safetensors or model.safetensors
    if not trainer.is_world_process_zero():  # other ranks took part in evaluate() and save_model() only
        return {}
    tok.save_pretrained(str(save_dir))  # with the chat template the eval stage generates with
    # The Trainer also pickles its arguments there; keep outputs pickle-free and readable instead.
    (save_dir / "training_args.bin").unlink(missing_ok=True)
    (save_dir / "training_args.json").write_text(trainer.args.to_json_string())

    history = trainer.state.log_history
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, out_dir / "training_curves.png")
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = float(trainer.state.num_input_tokens_seen or 0)
    metrics = {
        "train/final_loss": losses[-1] if losses else result.training_loss,
        "train/mean_loss": result.training_loss,
        "train/val_loss": final_eval.get("eval_loss"),
        "train/steps": trainer.state.global_step,
        "train/trainable_params": trainable,
        "train/total_params": total,
        "train/tokens_seen": tokens,
        "train/tokens_per_s": tokens / wall if wall else 0.0,
        "train/wall_s": wall,
        "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        metrics["train/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {"model_path": model_path if kind == "adapter" else str(save_dir),
            "adapter_path": str(save_dir) if kind == "adapter" else None,
            "metrics": metrics,
            "artifacts": [save_dir, out_dir / "log_history.json", out_dir / "training_curves.png"]}


# The stage runs train() through sftflow.launch in a content-keyed work folder (resume, cache).
from sftflow.tasks.train_run import train_task  # noqa: E402,F401
