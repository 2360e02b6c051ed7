"""Stage 5: supervised fine-tuning with TRL's SFTTrainer: LoRA (default), QLoRA, full, or frozen layers.

`build_trainer` builds the SFTTrainer (model, PEFT or freezing, precision, SFTConfig, datasets, batching);
`train` runs it and writes the outputs. Input is the template stage's pre-tokenized rows (input_ids +
assistant_masks, which TRL turns into labels) and its tokenizer, which carries the chat template used, so
the saved adapter/model folder generates with the template it was trained on.

Hardware choices are checked by `check_hardware` before anything heavy loads: QLoRA and bf16/fp16 need a
GPU. Batching: `padding_free` (default) flattens each batch into one row with position_ids restarting per
record: the same batches and losses as `padded` (TRL's default) without computing pad tokens; `packed` is TRL's
best-fit-decreasing packing into rows of `pack_length` tokens (also padding-free). Flattened rows load the model
with sftflow's `sdpa_varlen` attention (sftflow/attention.py), which attends within each record only, at the
record's own cost (tests/test_packing.py proves the isolation).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import resource
import time
from importlib import resources
from pathlib import Path

import yaml

from sftflow import attention
from sftflow.checkpoints import run_trainer, schedule_args
from sftflow.configs.schema import TrainConfig
from sftflow.errors import UserError
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl


class TrainSetupError(UserError, ValueError):
    """A training setup this machine or model cannot run; raised before the model loads."""


def precision(cfg: TrainConfig) -> str:
    """The precision to train in: cfg.precision, with 'auto' resolved from the hardware."""
    import torch

    gpu = torch.cuda.is_available()
    if cfg.precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "fp32"
    return cfg.precision


def check_hardware(cfg: TrainConfig) -> None:
    """Fail fast, before data or model loading, on a method/precision this machine cannot run."""
    import torch

    gpu = torch.cuda.is_available()
    if cfg.method == "qlora":
        if not gpu:
            raise TrainSetupError("train.method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine "
                                  "has none. Use method 'lora' (same adapter, unquantised base) on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise TrainSetupError("train.method 'qlora' needs bitsandbytes: pip install 'sftflow[gpu]'") from exc
    if cfg.precision in ("bf16", "fp16") and not gpu:
        raise TrainSetupError(f"train.precision {cfg.precision!r} needs a CUDA GPU; this machine has none. "
                              "Use 'auto' (fp32 on CPU) or 'fp32'.")
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainSetupError("train.precision 'bf16': this GPU does not support bf16; use 'fp16' or 'auto'")


def lora_targets(model_type: str, cfg: TrainConfig) -> list[str] | str:
    """Configured target modules, else the per-architecture default (configs/lora_targets.yaml)."""
    if cfg.lora.target_modules is not None:
        return cfg.lora.target_modules
    defaults = yaml.safe_load(resources.files("sftflow.configs").joinpath("lora_targets.yaml").read_text())
    return defaults.get(model_type, "all-linear")


def freeze(model, cfg: TrainConfig) -> list[str]:
    """Freeze the input embeddings + the first K decoder blocks, and parameters matching a pattern."""
    n_layers = model.config.get_text_config().num_hidden_layers
    if cfg.freeze.first_layers > n_layers:
        raise TrainSetupError(f"train.freeze.first_layers={cfg.freeze.first_layers} but the model has {n_layers} blocks")
    blocks = next((name for name, mod in model.named_modules()
                   if type(mod).__name__ == "ModuleList" and len(mod) == n_layers), None)
    if blocks is None and cfg.freeze.first_layers:
        raise TrainSetupError("cannot find the model's decoder blocks; freeze by train.freeze.patterns instead")
    prefixes = [f"{blocks}.{i}." for i in range(cfg.freeze.first_layers)]
    embed = model.get_input_embeddings().weight if cfg.freeze.first_layers else None
    patterns = [re.compile(p) for p in cfg.freeze.patterns]
    frozen = []
    for name, param in model.named_parameters():
        if param is embed or name.startswith(tuple(prefixes)) or any(p.search(name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise TrainSetupError(f"train.freeze matched no parameter (patterns {cfg.freeze.patterns})")
    if all(not p.requires_grad for p in model.parameters()):
        raise TrainSetupError("train.freeze froze every parameter: nothing would train")
    return frozen


def load_model(model_path: str, cfg: TrainConfig, trust_remote_code: bool):
    """Float32 weights (mixed precision autocasts); 4-bit NF4 with bf16/fp16 compute for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if cfg.batching != "padded":  # records of a flattened row attend only within themselves, at their own cost
        kwargs["attn_implementation"] = attention.register()
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision(cfg) == "bf16" else torch.float16
        kwargs |= {"dtype": compute, "device_map": {"": torch.cuda.current_device()},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=compute)}
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, **kwargs)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model


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
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        logging_steps=cfg.logging_steps,
        **schedule_args(cfg, has_eval),  # validation, checkpoints, best model (sftflow.checkpoints)
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
    )
    return SFTConfig(**{**args, **overrides})


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


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
    """-> (SFTTrainer ready to .train(), params describing what was built).

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
    params = {"train.precision_resolved": precision(cfg), "train.model_type": model.config.model_type}
    peft_config = None
    if cfg.method in ("lora", "qlora"):
        targets = lora_targets(model.config.model_type, cfg)
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
        params["train.lora.target_modules_resolved"] = json.dumps(targets)
    elif cfg.method == "frozen":
        params["train.frozen_params"] = len(freeze(model, cfg))
    trainer = _counting_trainer_class()(
        model=model, args=sft_args(cfg, output_dir, val_ds is not None, **sft_overrides),
        train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
        peft_config=peft_config, callbacks=[_step_logger(), *(callbacks or [])])
    params["train.trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    params["train.total_params"] = sum(p.numel() for p in trainer.model.parameters())
    return trainer, params


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loss", ("loss", "eval_loss")), ("learning rate", ("learning_rate",)), ("grad norm", ("grad_norm",)))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.5))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_xlabel("step"), ax.set_ylabel(label)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
          trust_remote_code: bool = False) -> dict:
    import torch

    trainer, params = build_trainer(token_paths, model_path, cfg, out_dir / "checkpoints",
                                    trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    result = run_trainer(trainer, cfg)  # resumes from out_dir/checkpoints; early stopping
    wall = time.perf_counter() - start
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    # Token counts of this process's training (a resumed run counts from the resume point), summed over ranks.
    counts = trainer.accelerator.reduce(torch.tensor([trainer.input_tokens, trainer.trained_tokens]), reduction="sum")
    tokens, trained_tokens = (int(c) for c in counts.tolist())

    kind = "adapter" if cfg.method in ("lora", "qlora") else "model"
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


# The stage runs train() through sftflow.launch in a content-keyed work folder (resume, cache).
from sftflow.tasks.train_run import train_task  # noqa: E402,F401
