"""Which device a training process works on, decided without GPUs: a launched worker's own GPU (QLoRA loads its
base there before accelerate's state exists), one GPU for an in-process training on a host with several, and the
token-count reduction on the accelerator's device (NCCL reduces CUDA tensors only)."""

import torch

from sftflow.configs.training import TrainConfig
from sftflow.tasks.training.devices import local_index, pin_single_device, reduce_counts, single_device_warning
from sftflow.tasks.training.trainer import sft_args


def test_a_launched_worker_loads_onto_its_local_rank_and_a_single_process_onto_the_first_gpu():
    assert local_index({}) == 0
    assert local_index({"LOCAL_RANK": "3", "RANK": "11"}) == 3  # the node-local index, not the global rank


def test_one_process_seeing_several_gpus_trains_on_the_first_and_says_how_to_use_all():
    assert single_device_warning(0, distributed=False) is None  # CPU
    assert single_device_warning(1, distributed=False) is None
    assert single_device_warning(8, distributed=True) is None  # each worker has its own GPU already
    warning = single_device_warning(4, distributed=False)
    assert "cuda:0" in warning and "CUDA_VISIBLE_DEVICES" in warning
    assert "train.launcher.kind: accelerate" in warning and "num_processes: 4" in warning


def test_pinning_leaves_the_trainer_one_gpu_instead_of_data_parallel(tmp_path):
    args = sft_args(TrainConfig(), tmp_path, has_eval=False)
    assert pin_single_device(args) is None and args.n_gpu == 0  # this CPU host: nothing to pin
    args._n_gpu = 4  # what TrainingArguments counts on a host with 4 visible GPUs and no launcher
    assert "num_processes: 4" in pin_single_device(args)
    assert args.n_gpu == 1  # the Trainer then skips nn.DataParallel, which TRL's SFTTrainer refuses


class _MetaAccelerator:
    """Only what reduce_counts uses, on a device no tensor lands on by default: on this CPU host a real
    Accelerator's device is the default device, so it could not tell the two apart."""

    device = torch.device("meta")
    seen = None

    def reduce(self, tensor, reduction):
        self.seen = (tensor.device, reduction)
        return torch.zeros(tensor.shape, dtype=tensor.dtype)


def test_token_counts_are_reduced_on_the_accelerators_device():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    meta = _MetaAccelerator()
    reduce_counts(meta, [3, 5])
    assert meta.seen == (torch.device("meta"), "sum")
    try:  # and through a real accelerator (one process here; tests/test_train_run.py runs two over gloo)
        assert reduce_counts(Accelerator(cpu=True), [3, 5]) == [3, 5]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
