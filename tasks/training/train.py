"""Stage 5: supervised fine-tuning: LoRA (default), QLoRA, full, or frozen layers (setup.py), with TRL's
SFTTrainer (trainer.py). `train` runs it (resuming from the last checkpoint) and writes the outputs: the adapter
or model folder with the tokenizer and chat template it was trained with (so evaluation generates with the same
template), optionally the merged model, the step curves, and the metrics of the stage. run.py runs it in a
content-keyed work folder (resume, cache) through launch.py (in this process or as accelerate workers).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from sftflow.charts import plot_curves
from sftflow.configs.training import ADAPTER_METHODS, TrainConfig
from sftflow.results import Trained
from sftflow.tasks.training.checkpoints import run_trainer
from sftflow.tasks.training.devices import reduce_counts
from sftflow.tasks.training.trainer import build_trainer


def save_merged(adapter_dir: Path, model_path: str, tok, dest: Path, trust_remote_code: bool) -> None:
    """Base (unquantised, float32) + adapter merged into plain safetensors weights, with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def train(token_paths: dict, model_path: str, cfg: TrainConfig, out_dir: Path,
          trust_remote_code: bool = False) -> Trained:
    import torch

    trainer, params = build_trainer(token_paths, model_path, cfg, out_dir / "checkpoints",
                                    trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    result = run_trainer(trainer, cfg)  # resumes from out_dir/checkpoints; early stopping
    wall = time.perf_counter() - start
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    # Token counts of this process's training (a resumed run counts from the resume point), summed over ranks.
    tokens, trained_tokens = reduce_counts(trainer.accelerator, [trainer.input_tokens, trainer.trained_tokens])

    kind = "adapter" if cfg.method in ADAPTER_METHODS else "model"
    save_dir = out_dir / kind
    trainer.save_model(str(save_dir))  # safetensors: adapter_model.safetensors or model.safetensors
    if not trainer.is_world_process_zero():  # other ranks took part in evaluate() and save_model() only
        return {}
    trainer.processing_class.save_pretrained(str(save_dir))  # with the chat template evaluation generates with
    # The Trainer also pickles its arguments there; keep outputs pickle-free and readable instead.
    (save_dir / "training_args.bin").unlink(missing_ok=True)
    (save_dir / "training_args.json").write_text(trainer.args.to_json_string())
    outputs = {"model_path": model_path if kind == "adapter" else str(save_dir),
               "adapter_path": str(save_dir) if kind == "adapter" else None}
    artifacts = [save_dir]
    if cfg.merge_adapter:
        save_merged(save_dir, model_path, trainer.processing_class, out_dir / "merged", trust_remote_code)
        outputs = {"model_path": str(out_dir / "merged"), "adapter_path": None, "merged_path": str(out_dir / "merged")}
        artifacts.append(out_dir / "merged")

    history = trainer.state.log_history
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, out_dir / "training_curves.png")
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "train/final_loss": losses[-1] if losses else result.training_loss,
        "train/mean_loss": result.training_loss,
        "train/val_loss": final_eval.get("eval_loss"),
        "train/steps": trainer.state.global_step,
        "train/trainable_params": params["train.trainable_params"],
        "train/total_params": params["train.total_params"],
        "train/trainable_share": params["train.trainable_params"] / params["train.total_params"],
        "train/tokens_seen": tokens,
        "train/tokens_per_s": tokens / wall if wall else 0.0,
        "train/trained_tokens": trained_tokens,
        "train/trained_tokens_per_s": trained_tokens / wall if wall else 0.0,
        "train/wall_s": wall,
        "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        metrics["train/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**outputs, "metrics": metrics, "params": params,
            "artifacts": [*artifacts, out_dir / "log_history.json", out_dir / "training_curves.png"]}

