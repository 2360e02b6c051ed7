"""Numeric precision, chosen in one place from the hardware: what training runs in, what evaluation loads."""

from __future__ import annotations


def training(setting: str = "auto") -> str:
    """'auto' -> bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU; any other setting as given."""
    import torch

    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def inference() -> str:
    """Weights for evaluation and generation, as torch names them: 'bfloat16' on a GPU that has it, else
    'float32' (fp16 can overflow). The name is what lm-eval's model_args and the result cache's key take."""
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def inference_dtype():
    """inference() as a torch dtype, for loading weights with transformers."""
    import torch

    return getattr(torch, inference())
