"""What benchmarks/gpu_check.py measures, apart from running it: the card's peak, model FLOPs per token, and a
clock over optimizer steps only. The formulas and the peak table's source: docs/GPU.md.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

# Dense (no sparsity) tensor-core peak, TFLOP/s, in the precision `auto` trains in there: bf16 from Ampere on,
# fp16 (FP32 accumulate) on T4 and V100. Keyed by the exact torch.cuda.get_device_name(): a substring would take an
# H100 PCIe (756) for an SXM part (989). Figures from the vendor datasheets; see docs/GPU.md.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L4": 121.0, "NVIDIA L40S": 362.0, "NVIDIA A10G": 70.0, "NVIDIA A10": 125.0,
    "Tesla T4": 65.0, "Tesla V100-SXM2-32GB": 125.0, "Tesla V100-SXM2-16GB": 125.0,
    "NVIDIA GeForce RTX 4090": 165.0, "NVIDIA GeForce RTX 3090": 71.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense peak from PEAK_TFLOPS, by its exact name; None for a card not in it."""
    return PEAK_TFLOPS.get(device_name)


def flops_per_token(total_params: int, trainable_params: int) -> float:
    """Model FLOPs of one trained token: forward 2N, backward through every weight for the activation gradients
    2N, and weight gradients 2 per trainable parameter. Full fine-tuning: 6N; LoRA/QLoRA: 4N + 2 x adapter.
    N counts 4-bit weights as the weights they stand for (they are multiplied at full size after dequantising)."""
    return 4 * total_params + 2 * trainable_params


def mfu(tokens_per_s: float, total_params: int, trainable_params: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs the tokens needed per second over the card's peak."""
    if not peak:
        return None
    return flops_per_token(total_params, trainable_params) * tokens_per_s / (peak * 1e12)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():  # CUDA work is queued: a step has run only when the device is done with it
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Times optimizer steps only (on_step_begin to on_step_end: forward, backward, optimizer; the batches are
    already fetched), after `warmup` steps (compilation, allocator growth, autotuning). Validation, checkpoint
    saves and the best model's reload run outside those windows. Tokens are the trainer's own non-pad count
    (`input_tokens`) over the same steps: the trainer binds itself (`bind_trainer`)."""

    def __init__(self, warmup: int):
        self.warmup, self.trainer = warmup, None
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        self._start, self._tokens_at_start = 0.0, 0

    def bind_trainer(self, trainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start, self._tokens_at_start = time.perf_counter(), self.trainer.input_tokens

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if state.global_step > self.warmup:  # global_step counts this step already
            self.seconds += time.perf_counter() - self._start
            self.tokens += self.trainer.input_tokens - self._tokens_at_start
            self.steps += 1

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.steps and self.seconds else None
