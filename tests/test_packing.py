"""Packed and padding-free batches: records in one row must not attend to each other.

The batch comes from the real trainer's dataloader (TRL's packing and collator); each record's loss
computed inside that batch must equal its loss computed alone. A negative control (the same row with an
all-ones attention mask and no sequence boundaries, which turns the block-diagonal masking off) shows the test
can see leakage.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, cuda_only, make_record, template_splits

from sftflow.configs.training import TrainConfig
from sftflow.records import read_jsonl
from sftflow.tasks.training import attention
from sftflow.tasks.training.trainer import build_trainer


@pytest.fixture(scope="module")
def token_paths(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("pack")
    recs = [make_record(i, "The movie was great. " * (1 + i % 5) + f"Review {i}.", "POS" if i % 2 else "NEG")
            for i in range(12)]
    return template_splits(d, tiny_model, recs, recs[:2])["paths"]


def segment_losses(logits, input_ids, labels, position_ids):
    """{tuple(input_ids of a record): its mean token loss} for each record of a flattened row."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    out = {}
    for s, e in zip(starts, starts[1:]):
        loss = F.cross_entropy(logits[0, s:e - 1], labels[0, s + 1:e], ignore_index=-100)
        out[tuple(input_ids[0, s:e].tolist())] = loss.item()
    return out


def alone_losses(model, token_path):
    out = {}
    for row in read_jsonl(token_path):
        ids = torch.tensor([row["input_ids"]], device=model.device)
        labels = ids.masked_fill(torch.tensor([row["assistant_masks"]], device=model.device) == 0, -100)
        with torch.no_grad():
            out[tuple(row["input_ids"])] = model(input_ids=ids, labels=labels).loss.item()
    return out


@pytest.mark.parametrize("batching", ["packed", "padding_free"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", attention.NAME])
def test_records_in_a_packed_row_do_not_attend_to_each_other(tmp_path, token_paths, tiny_model, batching, attn):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(method="full", batching=batching, pack_length=256, batch_size=4, max_steps=1)
    trainer, _ = build_trainer(token_paths, tiny_model, cfg, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    n_records = int((batch["position_ids"][0] == 0).sum())
    assert n_records >= 3, "the row should hold several records"

    if attn == attention.NAME:
        attention.register()
    # The reference runs where the trainer's batches are (cuda:0 on a GPU machine).
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).to(trainer.args.device).eval()
    alone = alone_losses(model, token_paths["train"])
    # The forward the trainer makes: every collated key but labels, and no KV cache (SFTTrainer.compute_loss
    # sets use_cache=False; with a cache transformers would not derive the block-diagonal mask).
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        leaky = model(**{k: v for k, v in inputs.items() if not k.startswith("cu_seq_lens")}, use_cache=False,
                      attention_mask=torch.ones_like(batch["input_ids"])).logits
    packed = segment_losses(logits, batch["input_ids"], batch["labels"], batch["position_ids"])
    assert len(packed) == n_records
    for ids, loss in packed.items():
        assert loss == pytest.approx(alone[ids], abs=1e-4)
    # Negative control: a plain causal mask over the row lets later records see earlier ones.
    leaked = segment_losses(leaky, batch["input_ids"], batch["labels"], batch["position_ids"])
    assert sum(abs(leaked[ids] - alone[ids]) > 1e-3 for ids in packed) >= n_records - 1


def test_padding_free_matches_padded_training_loss(tmp_path, token_paths, tiny_model):
    """Same records per step, same order: padding-free only drops the pad tokens, so the losses match."""
    losses, tokens = {}, {}
    for batching in ("padded", "padding_free"):
        # fp32: on a GPU, bf16 kernels for padded and flattened rows round differently.
        cfg = TrainConfig(method="full", batching=batching, batch_size=4, max_steps=3, logging_steps=1,
                          learning_rate=1e-3, warmup_ratio=0.0, precision="fp32")
        trainer, _ = build_trainer(token_paths, tiny_model, cfg, tmp_path / batching)
        trainer.train()
        losses[batching] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens[batching] = (trainer.input_tokens, trainer.trained_tokens)
    assert losses["padded"] == pytest.approx(losses["padding_free"], rel=1e-3)
    assert tokens["padded"] == tokens["padding_free"]  # the same non-pad and trained tokens were seen


def test_packing_refuses_records_longer_than_a_row(tmp_path, token_paths, tiny_model):
    from sftflow.tasks.training.setup import TrainSetupError

    with pytest.raises(TrainSetupError, match="pack_length"):
        build_trainer(token_paths, tiny_model, TrainConfig(batching="packed", pack_length=8), tmp_path)


@pytest.mark.parametrize("batching", ["padded", "padding_free", "packed"])
def test_flattened_rows_train_with_varlen_attention_and_save_a_portable_model(tmp_path, token_paths, tiny_model,
                                                                              batching):
    """Flattened rows get sftflow's per-record attention; the saved model does not name it, so it loads anywhere."""
    import json

    cfg = TrainConfig(method="full", batching=batching, batch_size=4, max_steps=1)
    trainer, params = build_trainer(token_paths, tiny_model, cfg, tmp_path)
    expected = "sdpa" if batching == "padded" else attention.choose(batching, CUDA)  # padded: the family default
    assert trainer.model.config._attn_implementation == expected
    assert params["train.attention"].startswith(expected)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert "flash_attention" not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "llama"


def _rows(lengths, heads, kv_heads, dim=16, device="cpu", dtype=torch.float32):
    """Random q/k/v of one flattened row, HF layout (1, heads, tokens, dim), and its cu_seq_lens."""
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def _per_record_reference(q, k, v, cu):
    """Each record alone through sdpa with its kv heads repeated: what the row's attention must equal."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
                      for s, e in zip(bounds, bounds[1:])], dim=2).transpose(1, 2)


def _varlen_reference(q, k, v, cu_seqlens, max_len, scale, window=None):
    """The fused kernel's contract on the CPU: q/k/v (tokens, heads, dim), causal within each record."""
    bounds = cu_seqlens.tolist()
    heads_first = [(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1))
                   for s, e in zip(bounds, bounds[1:])]
    return torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, scale=scale).transpose(0, 1)
                      for qkv in heads_first])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query (as SmolLM2), multi-query
def test_varlen_attention_equals_each_record_alone_with_grouped_kv_heads(kv_heads):
    """The CPU path (sdpa per record) and the fused kernel's layout (a whole row, kv heads expanded) both equal
    each record attended alone."""
    from types import SimpleNamespace

    q, k, v, cu = _rows([5, 9, 3, 7], heads=4, kv_heads=kv_heads)
    module = SimpleNamespace(training=False, num_key_value_groups=4 // kv_heads, is_causal=True)
    out, _ = attention.varlen_rows_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9)
    flat = attention.flat_attention(q, k, v, cu, 9, None, _varlen_reference, torch.float32)
    assert out.shape == flat.shape == (1, 24, 4, 16)
    assert torch.allclose(out, _per_record_reference(q, k, v, cu), atol=1e-5)
    assert torch.allclose(flat, _per_record_reference(q, k, v, cu), atol=1e-5)


@cuda_only
def test_cuda_half_precision_rows_run_the_fused_varlen_kernel_and_match_per_record_attention():
    from sftflow.precision import current_card

    card = current_card()
    dtype = torch.bfloat16 if card.bf16 else torch.float16
    q, k, v, cu = _rows([64, 200, 17, 128], heads=8, kv_heads=2, dim=64, device="cuda", dtype=dtype)
    assert attention.fused(q.device, q.dtype) == card.ampere  # the fused kernel needs 8.0; older cards: per record
    module = type("M", (), {"training": False, "num_key_value_groups": 4, "is_causal": True})()
    out, _ = attention.varlen_rows_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                           max_length_q=200)
    ref = _per_record_reference(q.float(), k.float(), v.float(), cu)
    assert (out.float() - ref).abs().max().item() < 3e-2  # bf16/fp16 rounding
