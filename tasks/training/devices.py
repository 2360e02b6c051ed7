"""Which device a training process works on: its own GPU under a launcher, one GPU in-process, and collectives on
the accelerator's device (NCCL reduces CUDA tensors only).

Pure decisions, so they are tested on a machine without GPUs (tests/test_devices.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def local_index(environ: Mapping[str, str]) -> int:
    """This process's GPU among the visible ones: LOCAL_RANK, which torchrun and `accelerate launch` set per
    worker (indices count within CUDA_VISIBLE_DEVICES); 0 for a single process. Readable before accelerate's
    state exists, which is when a QLoRA base is loaded."""
    return int(environ.get("LOCAL_RANK", 0))


def single_device_warning(n_gpu: int, distributed: bool) -> str | None:
    """None, or why one process that sees several GPUs trains on the first only.

    Without a distributed launcher the Trainer would wrap the model in nn.DataParallel over every visible GPU, and
    TRL's SFTTrainer refuses DataParallel: training on cuda:0 (the first of CUDA_VISIBLE_DEVICES) runs, and
    data-parallel workers are what uses the others."""
    if distributed or n_gpu <= 1:
        return None
    return (f"{n_gpu} GPUs are visible to this one training process: it trains on the first only (cuda:0, the "
            "first of CUDA_VISIBLE_DEVICES). To train on all of them, set train.launcher.kind: accelerate with "
            f"train.launcher.num_processes: {n_gpu} (one data-parallel worker per GPU).")


def pin_single_device(args) -> str | None:
    """Apply single_device_warning to a TrainingArguments: n_gpu 1, the device it already has (cuda:0).
    -> the warning, or None when nothing changed."""
    from transformers.training_args import ParallelMode

    warning = single_device_warning(args.n_gpu, args.parallel_mode == ParallelMode.DISTRIBUTED)
    if warning:
        args._n_gpu = 1  # what the Trainer itself sets for a model placed with device_map
    return warning


def reduce_counts(accelerator, counts: Sequence[int]) -> list[int]:
    """Integer counts summed over the training's processes. The tensor is built on the accelerator's device:
    gloo reduces CPU tensors, NCCL only CUDA ones."""
    import torch

    summed = accelerator.reduce(torch.tensor(list(counts), device=accelerator.device), reduction="sum")
    return [int(c) for c in summed.tolist()]
