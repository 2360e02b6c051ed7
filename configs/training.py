"""The `train` section: method, LoRA shape, frozen layers, precision, batching, optimiser and schedule,
checkpoints, early stopping and the launcher."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sftflow.configs.base import Positive, Section


class LoraSection(Section):
    r: Positive = 8
    alpha: Positive = 16
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="None: the per-architecture default in configs/lora_targets.yaml")


class FreezeSection(Section):
    first_layers: int = Field(0, ge=0, description="frozen: freeze the embeddings and the first K transformer "
                                                   "blocks; lora/qlora: no adapter on the first K blocks")
    patterns: list[str] = Field([], description="also freeze parameters whose name matches one of these regexes")


# How training is run: checkpoints, early stopping, launcher.
class CheckpointSection(Section):
    """Checkpoints are what a killed training resumes from and what the best model is chosen among."""

    every_steps: Positive | None = Field(
        None, description="checkpoint interval; None: at every validation (eval_steps, else once per epoch)")
    keep: Positive = Field(2, description="most recent checkpoints kept while training (the best is kept too)")


class EarlyStoppingSection(Section):
    patience: Positive | None = Field(
        None, description="stop after this many validations without improvement; None: off")
    min_delta: float = Field(0.0, ge=0.0, description="a validation loss must drop by more than this to count")


class LauncherSection(Section):
    kind: Literal["inprocess", "accelerate"] = Field(
        "inprocess", description="inprocess: in the flow's process; accelerate: `accelerate launch` workers")
    num_processes: Positive = Field(1, description="data-parallel processes (accelerate only)")
    config_file: str | None = Field(None, description="accelerate config YAML, e.g. configs/accelerate/fsdp.yaml")

    @model_validator(mode="after")
    def _accelerate_options(self) -> "LauncherSection":
        if self.kind == "inprocess" and (self.num_processes > 1 or self.config_file):
            raise ValueError("num_processes > 1 and config_file need kind: accelerate")
        return self


ADAPTER_METHODS = ("lora", "qlora")  # saved as a PEFT adapter on the base; the others as a whole model


class TrainConfig(Section):
    # How the trainer is built: method, precision, batching, optimiser and schedule.
    method: Literal["lora", "qlora", "full", "frozen"] = "lora"
    lora: LoraSection = LoraSection()
    freeze: FreezeSection = FreezeSection()
    merge_adapter: bool = Field(False, description="also save the base model with the adapter merged in")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU")
    batching: Literal["padded", "padding_free", "packed"] = Field(
        "padding_free", description="padding_free: each batch flattened into one row without pad tokens (the "
                                    "same batches and losses as padded, faster); padded: TRL's default; "
                                    "packed: records packed best-fit into rows of pack_length tokens")
    pack_length: Positive = Field(1024, description="tokens per packed row (batching: packed)")
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs` epochs")
    batch_size: Positive = 8
    grad_accum: Positive = 1
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="Liger's fused RMSNorm/RoPE/SwiGLU kernels through TRL (CUDA, `sftflow[gpu]`); auto: "
                            "on when CUDA and liger-kernel are there. TRL fuses the LM head with the loss itself")
    logging_steps: Positive = 5
    eval_steps: Positive | None = Field(None, description="validation-loss interval; None: once per epoch")
    seed: int = 0
    # how training is run: checkpoints, early stopping, processes
    checkpoint: CheckpointSection = CheckpointSection()
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    launcher: LauncherSection = LauncherSection()

    @model_validator(mode="after")
    def _checkpoints_align_with_validation(self) -> "TrainConfig":
        # The best model is chosen among saved checkpoints, so checkpoints must fall on validation steps.
        every = self.checkpoint.every_steps
        if every is not None and (self.eval_steps is None or every % self.eval_steps):
            raise ValueError(f"checkpoint.every_steps ({every}) must be a multiple of eval_steps "
                             f"({self.eval_steps or 'unset: set it'}), so that every checkpoint has a validation loss")
        return self

    @model_validator(mode="after")
    def _freeze_only_when_frozen(self) -> "TrainConfig":
        wants = bool(self.freeze.first_layers or self.freeze.patterns)
        if self.method == "frozen" and not wants:
            raise ValueError("method 'frozen' needs freeze.first_layers > 0 or freeze.patterns")
        if self.method == "full" and wants:
            raise ValueError("freeze.* does not apply to method 'full' (use method 'frozen')")
        if self.method in ADAPTER_METHODS and self.freeze.patterns:
            raise ValueError("freeze.patterns applies to method 'frozen' only; LoRA takes freeze.first_layers "
                             "(no adapter on those blocks)")
        if self.merge_adapter and self.method not in ADAPTER_METHODS:
            raise ValueError("merge_adapter needs method 'lora' or 'qlora'")
        return self
