"""One precision decision for everything that loads weights to evaluate: held-out generation and lm-eval."""

import torch

from sftflow import precision
from sftflow.models import load_causal_lm


def test_generation_and_lm_eval_load_weights_in_the_same_dtype(tiny_model):
    expected = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert precision.inference() == expected  # the name lm-eval's model_args and the result cache key take
    assert precision.inference_dtype() == getattr(torch, expected)
    assert load_causal_lm(tiny_model).dtype == precision.inference_dtype()  # held-out generation loads this
