"""Names that differ across the supported range of the ML stack (README: "Tested versions"), resolved here from
the installed version, so the rest of the code uses one spelling."""

from __future__ import annotations


def checkpointing_arg(enabled: bool) -> dict:
    """SFTConfig's gradient-checkpointing switch: `activation_checkpointing` in newer transformers releases
    (where the old name warns on every run), `gradient_checkpointing` before it existed (5.17 has only that)."""
    from transformers import TrainingArguments

    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}


def liger_available() -> bool:
    """Liger's triton kernels are importable (the `gpu` extra); they run on CUDA only."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()
