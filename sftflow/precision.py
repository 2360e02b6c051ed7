"""Numeric precision and the attention kernel, chosen in one place from the card (or the CPU).

The choices are pure functions of a `Card` (compute capability, native bf16) and of what is installed, so they
are tested over a table of cards and CPUs on a machine that has none of them (tests/test_precision.py);
`current_card()` reads this machine's. Three facts drive them:

- `torch.cuda.is_bf16_supported()` also says True on pre-Ampere cards (V100 7.0, T4 7.5), where bf16 is emulated
  and slow; only capability 8.0 and newer have it in hardware, so `auto` trains those cards in fp16.
- flash-attn 2 and PyTorch's varlen kernel (`torch.nn.attention.varlen`, built on the flash-attention kernels
  torch ships) need capability 8.0 and fp16/bf16; elsewhere flattened rows take the per-record sdpa path
  (correct, slower).
- CPUs with bf16 matrix instructions (AMX-BF16, AVX512-BF16) multiply bf16 several times faster than fp32; others
  (AVX2-only) would only convert, slower. `auto` on such a CPU trains under bf16 autocast (fp32 master weights)
  and evaluates in bf16; elsewhere fp32. SFTFLOW_CPU_BF16=0 keeps any CPU in fp32 (results that do not depend on
  which CPU ran them, as the test suite wants); =1 takes bf16 on any CPU (to test that path anywhere).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

AMPERE = (8, 0)  # the first capability with bf16 tensor cores and the flash-attention kernels
HALF = ("bf16", "fp16")
# attention_kernel's answers: the two transformers names a model loads with, and the two paths of sftflow's
# own `varlen_rows` (tasks/training/attention.py) for flattened rows.
SDPA, FLASH, TORCH_VARLEN, PER_RECORD = "sdpa", "flash_attention_2", "torch_varlen", "per_record_sdpa"


@dataclass(frozen=True)
class Card:
    """What the choices need to know about a device. capability None: no CUDA device (CPU)."""

    capability: tuple[int, int] | None = None
    native_bf16: bool = False  # is_bf16_supported(including_emulation=False); on a CPU: bf16 matrix instructions
    name: str = "cpu"
    bf16_unit: str = ""  # the CPU's instructions that make bf16 native: "AMX-BF16" or "AVX512-BF16"
    forced_by: str = ""  # a setting that decided native_bf16 instead of the hardware

    @property
    def cuda(self) -> bool:
        return self.capability is not None

    @property
    def ampere(self) -> bool:
        return self.capability is not None and self.capability >= AMPERE

    @property
    def bf16(self) -> bool:
        """bf16 in hardware; on CUDA the capability check also covers a torch that counts emulation."""
        return self.native_bf16 and (self.ampere or not self.cuda)


CPU = Card()  # a CPU without bf16 instructions


def cpu_card(flags: Mapping[str, bool], name: str = "cpu") -> Card:
    """A CPU from its instruction flags (torch.cpu.get_capabilities()' names): bf16 native with AMX-BF16 or
    AVX512-BF16."""
    unit = "AMX-BF16" if flags.get("amx_bf16") else "AVX512-BF16" if flags.get("avx512_bf16") else ""
    return Card(None, bool(unit), name, unit)


def training_precision(setting: str, card: Card) -> str:
    """'auto' -> bf16 on a card or CPU that has it natively, fp16 on other CUDA cards, fp32 on other CPUs; else as
    given. bf16 on a CPU is autocast over fp32 master weights, as mixed precision is on a GPU."""
    if setting != "auto":
        return setting
    if not card.cuda:
        return "bf16" if card.bf16 else "fp32"
    return "bf16" if card.bf16 else "fp16"


def precision_reason(setting: str, card: Card) -> str:
    """Why training_precision(setting, card) is what it is, for the stage's line and MLflow."""
    if setting != "auto":
        return "set in the config"
    if card.forced_by:
        return f"auto: {card.forced_by}"
    if not card.cuda:
        return (f"auto: the CPU has {card.bf16_unit}" if card.bf16
                else "auto: the CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)")
    major, minor = card.capability
    return f"auto: {card.name} (compute capability {major}.{minor}) {'has' if card.bf16 else 'has no'} native bf16"


def precision_problem(setting: str, card: Card) -> str | None:
    """Why `train.precision: setting` cannot run on this card, or None. bf16 runs on any CPU (slowly without the
    instructions, but right); fp16 needs a GPU."""
    if setting == "fp16" and not card.cuda:
        return ("train.precision 'fp16' needs a CUDA GPU; this machine has none. "
                "Use 'auto' (bf16 on CPUs with AMX-BF16/AVX512-BF16, else fp32), 'bf16' or 'fp32'.")
    if setting == "bf16" and not card.cuda:
        return None
    if setting == "bf16" and not card.bf16:
        major, minor = card.capability
        return (f"train.precision 'bf16': this GPU ({card.name}, compute capability {major}.{minor}) has no "
                "bf16 in hardware (Ampere, 8.0, and newer do; torch would only emulate it, slowly); "
                "use 'fp16' or 'auto' (fp16 on this card)")
    return None


def inference_precision(card: Card) -> str:
    """Weights for evaluation and generation, as torch names them: 'bfloat16' on a card or CPU with native bf16,
    else 'float32' (fp16 can overflow)."""
    return "bfloat16" if card.bf16 else "float32"


def attention_kernel(batching: str, card: Card, precision: str, flash_installed: bool,
                     torch_varlen_available: bool) -> str:
    """The attention a training runs: padded batches take sdpa; flattened rows (padding_free, packed) take
    flash-attn 2 or PyTorch's varlen kernel where the card (8.0+) and precision (fp16/bf16) allow, else sdpa once
    per record. `precision` is the resolved training precision ('bf16', 'fp16', 'fp32')."""
    if batching == "padded":
        return SDPA
    fused_ok = card.ampere and precision in HALF
    if fused_ok and flash_installed:
        return FLASH
    if fused_ok and torch_varlen_available:
        return TORCH_VARLEN
    return PER_RECORD


@lru_cache(maxsize=16)
def _cuda_card(index: int) -> Card:
    import torch

    capability = tuple(torch.cuda.get_device_capability(index))
    try:
        with torch.cuda.device(index):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument counts emulation: decide from the capability alone
        native = capability >= AMPERE
    return Card(capability, native, torch.cuda.get_device_name(index))


def _this_cpu() -> Card:
    forced = os.environ.get("SFTFLOW_CPU_BF16", "auto")  # read at each call: a test or benchmark may change it
    if forced in ("0", "1"):  # 0: fp32 on any CPU; 1: bf16 on any CPU (slow without the instructions, but right)
        return Card(None, forced == "1", "cpu", forced_by=f"SFTFLOW_CPU_BF16={forced}")
    return _cpu_from_flags()


@lru_cache(maxsize=1)
def _cpu_from_flags() -> Card:
    import torch

    if hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        return cpu_card(caps, str(caps.get("cpu_name") or "cpu"))
    return cpu_card({"avx512_bf16": torch.cpu._is_avx512_bf16_supported()})  # torch before get_capabilities


def current_card(device=None) -> Card:
    """The card of `device` (a torch.device; default: the current CUDA device); this CPU when it is not CUDA."""
    import torch

    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return _this_cpu()
    index = torch.device(device).index if device is not None else None
    return _cuda_card(torch.cuda.current_device() if index is None else index)


def training(setting: str = "auto") -> str:
    """training_precision() on this machine's card."""
    return training_precision(setting, current_card())


def training_reason(setting: str = "auto") -> str:
    return precision_reason(setting, current_card())


def inference_reason() -> str:
    return precision_reason("auto", current_card())


def eval_params() -> dict:
    """What an evaluating stage logs: the weights' precision and why."""
    return {"eval.precision_resolved": inference(), "eval.precision_reason": inference_reason()}


def inference() -> str:
    """inference_precision() on this machine's card. The name is what lm-eval's model_args and the result
    cache's key take."""
    return inference_precision(current_card())


def inference_dtype():
    """inference() as a torch dtype, for loading weights with transformers."""
    import torch

    return getattr(torch, inference())
