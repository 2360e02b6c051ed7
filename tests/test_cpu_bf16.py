"""The bf16 path a CPU with AMX-BF16/AVX512-BF16 takes under `precision: auto`, run on any CPU (slowly without the
instructions, but the same arithmetic): training under bf16 autocast, flattened-row attention, the LoRA merge that
evaluation loads. The assistant mask is computed from tokens alone, before any weights, so precision cannot move it.
"""

import pytest
import torch
import torch.nn.functional as F

from sftflow import precision
from sftflow.configs.training import TrainConfig
from sftflow.tasks.training import attention
from sftflow.tasks.training.trainer import build_trainer


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU taken as one with bf16 instructions: `auto` means bf16 for training and evaluation."""
    monkeypatch.setenv("SFTFLOW_CPU_BF16", "1")


def test_flattened_row_attention_under_cpu_bf16_autocast_matches_each_record_alone():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    lengths = [7, 19, 4, 12]
    q, k, v = (torch.randn(1, h, sum(lengths), 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = SimpleNamespace(training=False, num_key_value_groups=2, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row, _ = attention.varlen_rows_forward(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None,
                                               cu_seq_lens_q=cu, sliding_window=8)
    edges = cu.tolist()
    alone = []
    for s, e in zip(edges, edges[1:]):
        n = e - s
        mask = attention.visible(n, n, 8, True, "cpu")
        kk, vv = (t[:, :, s:e].repeat_interleave(2, dim=1) for t in (k, v))
        alone.append(F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, attn_mask=mask).transpose(1, 2))
    reference = torch.cat(alone, dim=1)
    assert row.dtype == torch.bfloat16
    assert (row.float() - reference).abs().max().item() < 3e-2  # bf16 rounding of unit-scale values


def test_bf16_training_on_cpu_autocasts_and_matches_padded_batches(tmp_path, token_paths, tiny_model, bf16_cpu):
    """`auto` on such a CPU trains in bf16 under autocast (fp32 master weights); flattened rows still give the same
    per-step losses as padded batches, within bf16's rounding."""
    losses = {}
    for batching in ("padded", "padding_free"):
        cfg = TrainConfig(method="full", batching=batching, batch_size=4, max_steps=3, logging_steps=1,
                          learning_rate=1e-3, warmup_ratio=0.0)
        trainer, params = build_trainer(token_paths, tiny_model, cfg, tmp_path / batching)
        assert params["train.precision_resolved"] == "bf16"
        assert params["train.precision_reason"] == "auto: SFTFLOW_CPU_BF16=1"
        assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
        trainer.train()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
        losses[batching] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["padded"]) == 3 and all(loss == loss for loss in losses["padded"])  # finite
    assert losses["padded"] == pytest.approx(losses["padding_free"], rel=2e-2)


def test_the_lora_merge_evaluation_loads_in_bf16_gives_the_adapters_outputs(tmp_path, token_paths, tiny_model,
                                                                             bf16_cpu):
    from peft import LoraConfig, get_peft_model

    from sftflow.models import load_causal_lm

    assert precision.inference_dtype() == torch.bfloat16
    base = load_causal_lm(tiny_model)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so the merge has something to fold in
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 28, 64]])
    merged = load_causal_lm(tiny_model, adapter=str(tmp_path / "adapter"), merge=True)
    unmerged = load_causal_lm(tiny_model, adapter=str(tmp_path / "adapter"))
    plain = load_causal_lm(tiny_model)
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits.float() for m in (merged, unmerged, plain))
    assert (a - b).abs().max().item() < 5e-2  # bf16 weights round once merged
    assert (b - c).abs().max().item() > 5 * (a - b).abs().max().item()  # and the adapter changed the outputs


def test_a_training_cached_in_one_precision_is_not_reused_in_another(token_paths, tiny_model, monkeypatch):
    """`auto` resolves per machine: the state dir's cache keys the training by the precision that ran."""
    from sftflow.tasks.training.run import training_key

    keys = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("SFTFLOW_CPU_BF16", forced)
        keys[forced] = training_key(token_paths, tiny_model, TrainConfig())
    assert keys["0"] != keys["1"]
    assert training_key(token_paths, tiny_model, TrainConfig(precision="fp32")) == keys["0"]  # auto = fp32 there
