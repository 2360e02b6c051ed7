"""The SFTTrainer sftflow trains with: TRL's trainer on the template stage's pre-tokenized rows (input_ids +
assistant_masks, which TRL turns into labels), with the SFTConfig derived from the train config, token counting,
step metrics into the stage's MLflow run, and on CPU a loss computed from the trained positions only.

Batching: `padding_free` (default) flattens each batch into one row with position_ids restarting per record: the
same batches and losses as `padded` (TRL's default) without computing pad tokens; `packed` is TRL's
best-fit-decreasing packing into rows of `pack_length` tokens (also padding-free). Flattened rows attend within
each record only (attention.py; tests/test_packing.py proves the isolation).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from pathlib import Path

from sftflow import hooks
from sftflow import precision as prec
from sftflow.configs.training import ADAPTER_METHODS, TrainConfig
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl
from sftflow.tasks.training import attention, compat, devices
from sftflow.tasks.training.checkpoints import schedule_args
from sftflow.tasks.training.setup import (
    TrainSetupError,
    _gpu,
    adapted_layers,
    check_hardware,
    freeze,
    kernels,
    load_model,
    lora_targets,
    precision,
)

log = logging.getLogger("sftflow.train")


def _dataset(path: str):
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]} for r in read_jsonl(Path(path))]
    return Dataset.from_list(rows) if rows else None


def sft_args(cfg: TrainConfig, output_dir: Path, has_eval: bool, **overrides):
    from trl import SFTConfig

    prec = precision(cfg)
    args = dict(
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
        max_grad_norm=cfg.max_grad_norm,
        **compat.checkpointing_arg(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps,
        **schedule_args(cfg, has_eval),  # validation, checkpoints, best model (sftflow.tasks.training.checkpoints)
        report_to="none",  # metrics go to the stage's MLflow run through MlflowStepLogger
        seed=cfg.seed,
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        use_cpu=not _gpu(),
        # Record lengths were enforced (and counted) by the template stage; packing fills rows of pack_length.
        max_length=cfg.pack_length if cfg.batching == "packed" else None,
        packing=cfg.batching == "packed",
        packing_strategy="bfd",
        padding_free=cfg.batching == "padding_free",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_liger_kernel=kernels(cfg) == "liger",
    )
    return SFTConfig(**{**args, **overrides})


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
            # The stage's run: active in-process, or named by MLFLOW_RUN_ID in an accelerate worker; standalone
            # use (benchmarks) has neither and logs nothing.
            if numeric and (mlflow.active_run() is not None or os.environ.get("MLFLOW_RUN_ID")):
                mlflow.log_metrics(numeric, step=state.global_step)

    return MlflowStepLogger()


def trained_positions(labels):
    """Sequence positions whose next token is trained (in any row): the only logits the loss needs."""
    return (labels[:, 1:] != -100).any(0).nonzero().flatten()


def projected_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM cross-entropy from logits kept at `trained_positions(labels)`: the model's own loss, equal in value
    (summed over tokens, / the Trainer's token count across accumulation steps and ranks, or the mean)."""
    import torch.nn.functional as F

    targets = labels[:, 1:][:, trained_positions(labels)]
    loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1))


def weights(param) -> int:
    """How many weights a parameter holds: bitsandbytes packs two 4-bit weights per byte (numel counts bytes);
    its quant_state keeps the unpacked shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def _counting_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that also counts input (non-pad) and trained (label != -100) tokens.

        Counted here because the Trainer's own non-padding count compares input_ids with the pad id, which
        undercounts padding-free rows when pad == eos (as in ChatML tokenizers): every end-of-turn is missed.
        """

        input_tokens = trained_tokens = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # TRL's fused LM head projects only the trained positions with its triton kernel; without one (CPU) it
            # projects every position, in chunks, twice. On CPU the Trainer's own loss path is used instead, with
            # the model asked for the logits of trained positions only (logits_to_keep): with assistant-only loss
            # that skips the 49k-vocabulary projection for ~98% of the demo's tokens (-16 to -19% step time) and gives
            # the same loss. TRL's entropy and token-accuracy logs are what is lost.
            model = self.accelerator.unwrap_model(self.model)
            model = model.get_base_model() if hasattr(model, "get_base_model") else model
            if self.args.device.type == "cpu" and "logits_to_keep" in inspect.signature(model.forward).parameters:
                self.compute_loss_func = projected_loss
            for callback in self.callback_handler.callbacks:  # those that read the counts (a benchmark's clock)
                if hasattr(callback, "bind_trainer"):
                    callback.bind_trainer(self)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.input_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self.trained_tokens += int((inputs["labels"][..., 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.compute_loss_func is not projected_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {**inputs, "use_cache": False, "logits_to_keep": trained_positions(inputs["labels"])}
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return CountingSFTTrainer


def build_trainer(token_paths: dict, model_path: str, cfg: TrainConfig, output_dir: Path, *,
                  trust_remote_code: bool = False, callbacks: list | None = None, **sft_overrides):
    """-> (SFTTrainer ready to .train(), params describing what was built). Callbacks: the step logger, `callbacks`,
    then those the caller set in sftflow.hooks.train_callbacks (a sweep's pruner).

    token_paths: the template stage's {"train", "val", "tokenizer"}; sft_overrides: extra SFTConfig fields
    (e.g. save/eval strategy) that override the ones derived from cfg.
    """
    from peft import LoraConfig

    check_hardware(cfg)
    train_ds, val_ds = _dataset(token_paths["train"]), _dataset(token_paths["val"])
    if train_ds is None:
        raise TrainSetupError(f"{token_paths['train']}: no training rows")
    longest = max(len(ids) for ids in train_ds["input_ids"])
    if cfg.batching == "packed" and longest > cfg.pack_length:
        raise TrainSetupError(f"train.pack_length={cfg.pack_length} is shorter than the longest record ({longest} "
                              "tokens): packing would truncate it; raise train.pack_length")
    tok = load_tokenizer(token_paths.get("tokenizer") or model_path, trust_remote_code)
    model = load_model(model_path, cfg, trust_remote_code)
    params = {"train.precision_resolved": precision(cfg), "train.precision_reason": prec.training_reason(cfg.precision),
              "train.model_type": model.config.model_type, "train.kernels_resolved": kernels(cfg)}
    peft_config = None
    if cfg.method in ADAPTER_METHODS:
        targets = lora_targets(model.config.model_type, cfg)
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM",
                                 layers_to_transform=adapted_layers(model, cfg))
        params["train.lora.target_modules_resolved"] = json.dumps(targets)
    elif cfg.method == "frozen":
        params["train.frozen_params"] = len(freeze(model, cfg))
    args = sft_args(cfg, output_dir, val_ds is not None, **sft_overrides)
    if warning := devices.pin_single_device(args):  # several GPUs, one process: TRL refuses DataParallel
        log.warning(warning)
    trainer = _counting_trainer_class()(
        model=model, args=args,
        train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
        peft_config=peft_config, callbacks=[_step_logger(), *(callbacks or []), *hooks.train_callbacks.get()])
    params["train.attention"] = attention.describe(trainer.model, precision(cfg), trainer.args.device)
    params["train.trainable_params"] = sum(weights(p) for p in trainer.model.parameters() if p.requires_grad)
    params["train.total_params"] = sum(weights(p) for p in trainer.model.parameters())
    return trainer, params

