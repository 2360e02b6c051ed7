"""Precision and attention kernel, decided in one place from the card: a table of cards proves the choices on a
machine that has none, and evaluation loads weights in the precision the card has."""

import pytest
import torch

from sftflow import precision
from sftflow.models import load_causal_lm
from sftflow.precision import (
    CPU,
    Card,
    attention_kernel,
    cpu_card,
    inference_precision,
    precision_problem,
    precision_reason,
    training_precision,
)

# native_bf16 as torch without `including_emulation` reports it: True on every card, emulation counted.
V100, T4 = Card((7, 0), True, "Tesla V100-SXM2-32GB"), Card((7, 5), True, "Tesla T4")
A100, A10 = Card((8, 0), True, "NVIDIA A100-SXM4-80GB"), Card((8, 6), True, "NVIDIA A10")
H100, B200 = Card((9, 0), True, "NVIDIA H100 80GB HBM3"), Card((10, 0), True, "NVIDIA B200")
PRE_AMPERE, AMPERE_ON = (V100, T4), (A100, A10, H100, B200)
# CPUs by their flags (torch.cpu.get_capabilities()): an AVX2-only AMD EPYC, an AMD EPYC with AVX512-BF16, a Xeon
# with AMX.
EPYC_AVX2 = cpu_card({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "AMD EPYC")
EPYC_BF16 = cpu_card({"avx2": True, "avx512_bf16": True, "amx_bf16": False}, "AMD EPYC")
XEON_AMX = cpu_card({"avx512_bf16": True, "amx_bf16": True, "amx_tile": True}, "Intel Xeon")
CPUS = (EPYC_AVX2, EPYC_BF16, XEON_AMX)


@pytest.mark.parametrize("cpu", CPUS, ids=["avx2", "avx512_bf16", "amx"])
def test_a_cpu_trains_and_evaluates_in_bf16_exactly_when_it_has_bf16_instructions(cpu):
    native = cpu is not EPYC_AVX2
    assert cpu.bf16 == native and not cpu.cuda
    assert training_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert inference_precision(cpu) == ("bfloat16" if native else "float32")
    assert training_precision("fp32", cpu) == "fp32" and training_precision("bf16", cpu) == "bf16"  # explicit wins
    reason = precision_reason("auto", cpu)
    assert reason == ("auto: the CPU has AMX-BF16" if cpu is XEON_AMX else "auto: the CPU has AVX512-BF16"
                      if native else "auto: the CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)")
    assert precision_reason("fp32", cpu) == "set in the config"
    assert precision_problem("bf16", cpu) is None and "needs a CUDA GPU" in precision_problem("fp16", cpu)
    # Flattened rows on any CPU: sdpa once per record.
    assert attention_kernel("padding_free", cpu, training_precision("auto", cpu), True, True) == "per_record_sdpa"


@pytest.mark.parametrize("card", PRE_AMPERE + AMPERE_ON + (CPU,), ids=lambda c: c.name)
def test_auto_precision_is_bf16_only_where_the_card_has_it_in_hardware(card):
    expected = "fp32" if card is CPU else "bf16" if card in AMPERE_ON else "fp16"
    assert training_precision("auto", card) == expected
    assert inference_precision(card) == ("bfloat16" if card in AMPERE_ON else "float32")
    for setting in ("bf16", "fp16", "fp32"):
        assert training_precision(setting, card) == setting  # an explicit setting is kept, or refused below


@pytest.mark.parametrize("card", PRE_AMPERE, ids=lambda c: c.name)
def test_explicit_bf16_on_a_pre_ampere_card_is_refused_with_the_reason(card):
    problem = precision_problem("bf16", card)
    assert problem and card.name in problem and f"{card.capability[0]}.{card.capability[1]}" in problem
    assert "'fp16'" in problem
    assert precision_problem("fp16", card) is None and precision_problem("auto", card) is None


def test_fp16_on_cpu_is_refused_and_every_setting_runs_on_ampere():
    assert "needs a CUDA GPU" in precision_problem("fp16", CPU) and precision_problem("bf16", CPU) is None
    assert precision_problem("fp32", CPU) is None and precision_problem("auto", CPU) is None
    assert all(precision_problem(s, c) is None for s in ("auto", "bf16", "fp16", "fp32") for c in AMPERE_ON)


def test_a_card_without_native_bf16_is_not_taken_for_one():
    # What torch.cuda.is_bf16_supported(including_emulation=False) says on a pre-Ampere card.
    assert training_precision("auto", Card((7, 5), False, "Tesla T4")) == "fp16"
    assert not Card((8, 0), False).bf16


@pytest.mark.parametrize("card", PRE_AMPERE + AMPERE_ON + (CPU,), ids=lambda c: c.name)
@pytest.mark.parametrize("flash", [True, False], ids=["flash-attn", "no-flash-attn"])
def test_flattened_rows_take_a_fused_kernel_only_from_ampere_on_in_half_precision(card, flash):
    auto = training_precision("auto", card)
    kernel = attention_kernel("padding_free", card, auto, flash_installed=flash, torch_varlen_available=True)
    if card in AMPERE_ON:
        assert kernel == ("flash_attention_2" if flash else "torch_varlen")
    else:  # flash-attn 2 and torch's varlen kernel need 8.0: sdpa once per record (correct, slower)
        assert kernel == "per_record_sdpa"
    assert attention_kernel("packed", card, auto, flash, True) == kernel
    assert attention_kernel("padded", card, auto, flash, True) == "sdpa"
    # fp32 (explicit) has no fused kernel, and a torch without the varlen kernel leaves the per-record path.
    assert attention_kernel("padding_free", card, "fp32", flash, True) == "per_record_sdpa"
    assert attention_kernel("padding_free", card, auto, False, False) == "per_record_sdpa"


def test_this_machine_is_read_into_the_same_decisions():
    card = precision.current_card()
    assert card.cuda == torch.cuda.is_available()
    assert not precision.current_card(torch.device("cpu")).cuda
    assert precision.training() == training_precision("auto", card)
    if card.cuda:  # the real card's bf16 is native exactly from 8.0 on
        assert card.bf16 == (torch.cuda.get_device_capability() >= (8, 0))


def test_generation_and_lm_eval_load_weights_in_the_same_dtype(tiny_model):
    expected = inference_precision(precision.current_card())
    assert precision.inference() == expected  # the name lm-eval's model_args and the result cache key take
    assert precision.inference_dtype() == getattr(torch, expected)
    assert load_causal_lm(tiny_model).dtype == precision.inference_dtype()  # held-out generation loads this
