"""Training setup, checked and built before the trainer: hardware, precision, fused kernels, the model with its
method (LoRA targets, QLoRA's 4-bit base, frozen layers) and its attention.

`check_hardware` runs when the flow starts, before any stage: QLoRA, bf16/fp16 and Liger need a GPU.
"""

from __future__ import annotations

import os
import re
from importlib import resources

import yaml

from sftflow import precision as prec
from sftflow.configs.training import TrainConfig
from sftflow.errors import UserError
from sftflow.tasks.training import attention, compat, devices


class TrainSetupError(UserError, ValueError):
    """A training setup this machine or model cannot run; raised before the model loads."""


def precision(cfg: TrainConfig) -> str:
    """The precision to train in: cfg.precision, with 'auto' resolved from the hardware."""
    return prec.training(cfg.precision)


def check_hardware(cfg: TrainConfig, card: prec.Card | None = None) -> None:
    """Fail fast, before data or model loading, on a method/precision this machine (or `card`) cannot run."""
    card = card or prec.current_card()
    gpu = card.cuda
    if cfg.method == "qlora":
        if not gpu:
            raise TrainSetupError("train.method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine "
                                  "has none. Use method 'lora' (same adapter, unquantised base) on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise TrainSetupError("train.method 'qlora' needs bitsandbytes: pip install 'sftflow[gpu]'") from exc
    problem = prec.precision_problem(cfg.precision, card)  # bf16 only where it is native (8.0+)
    if problem:
        raise TrainSetupError(problem)
    if cfg.kernels == "liger" and not (gpu and compat.liger_available()):
        raise TrainSetupError("train.kernels 'liger' needs a CUDA GPU and liger-kernel (pip install 'sftflow[gpu]'); "
                              "use 'auto' to take them where they are available")


def kernels(cfg: TrainConfig) -> str:
    """The fused kernels to train with: cfg.kernels, with 'auto' resolved from the hardware and packages."""
    if cfg.kernels == "auto":
        return "liger" if _gpu() and compat.liger_available() else "none"
    return cfg.kernels


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def lora_targets(model_type: str, cfg: TrainConfig) -> list[str] | str:
    """Configured target modules, else the per-architecture default (configs/lora_targets.yaml)."""
    if cfg.lora.target_modules is not None:
        return cfg.lora.target_modules
    defaults = yaml.safe_load(resources.files("sftflow.configs").joinpath("lora_targets.yaml").read_text())
    return defaults.get(model_type, "all-linear")


def adapted_layers(model, cfg: TrainConfig) -> list[int] | None:
    """LoRA on the blocks after the first `freeze.first_layers` only (None: every block). Backpropagation
    then stops at the first adapted block, so the frozen blocks cost a forward pass and nothing more."""
    if not cfg.freeze.first_layers:
        return None
    n_layers = model.config.get_text_config().num_hidden_layers
    if cfg.freeze.first_layers >= n_layers:
        raise TrainSetupError(f"train.freeze.first_layers={cfg.freeze.first_layers} leaves no block to adapt: "
                              f"the model has {n_layers}")
    return list(range(cfg.freeze.first_layers, n_layers))


def freeze(model, cfg: TrainConfig) -> list[str]:
    """Freeze the input embeddings + the first K decoder blocks, and parameters matching a pattern."""
    n_layers = model.config.get_text_config().num_hidden_layers
    if cfg.freeze.first_layers > n_layers:
        raise TrainSetupError(f"train.freeze.first_layers={cfg.freeze.first_layers} but the model has "
                              f"{n_layers} blocks")
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
    from transformers import AutoConfig, AutoModelForCausalLM

    # Records of a flattened row attend only within themselves, at their own cost (a varlen kernel on CUDA), with
    # their family's windows, softcap and sinks.
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": torch.float32,
              "attn_implementation": attention.choose(cfg.batching, _gpu(), config, precision(cfg))}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision(cfg) == "bf16" else torch.float16
        # This process's own GPU: before the trainer exists nothing has set the current device, so every
        # accelerate worker would otherwise load its 4-bit base onto cuda:0.
        kwargs |= {"dtype": compute, "device_map": {"": devices.local_index(os.environ)},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=compute)}
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, **kwargs)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model

