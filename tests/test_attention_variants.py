"""Flattened rows honour every attention variant the supported families use: sliding windows (per layer, as Gemma 3's
layer types), logit softcapping (Gemma 2), attention sinks (gpt-oss).

The reference is each record run alone through the same weights with transformers' eager attention, which builds
each family's own masks; the flattened row goes through the attention sftflow trains with. Records are longer than
the 8-token windows, so a layer that ignored its window (or its softcap, or its sinks) would differ.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_record, template_splits

from sftflow.configs.training import TrainConfig
from sftflow.tasks.training import attention
from sftflow.tiny import build_tiny

FAMILIES = ["mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"]
LENGTHS = [23, 9, 31, 5]  # three records past the window, one inside it


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {f: str(build_tiny(d / f, f, vocab_size=300, num_kv_heads=2, initializer_range=0.2)) for f in FAMILIES}


def _load(path, impl):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)


def _row(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, sum(LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    # What TRL's padding-free collator hands the model (one tensor for q and k, as it does).
    return ids, {"position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                 "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}


def _loss(logits, ids):
    """Next-token loss inside each record, summed: the same function of both models' logits."""
    total, start = 0.0, 0
    for n in LENGTHS:
        total = total + F.cross_entropy(logits[0, start:start + n - 1], ids[0, start + 1:start + n], reduction="sum")
        start += n
    return total


def _flattened(path, ids, row):
    model = _load(path, attention.register())
    logits = model(input_ids=ids, use_cache=False, **row).logits
    _loss(logits, ids).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _per_record_eager(path, ids, window=True):
    model = _load(path, "eager")
    if not window:  # negative control: the same model with its windows wider than any record
        for layer in model.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = 10_000
        model.config.sliding_window = 10_000
    edges = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    logits = torch.cat([model(input_ids=ids[:, s:e], use_cache=False).logits for s, e in zip(edges, edges[1:])],
                       dim=1)
    _loss(logits, ids).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_flattened_row_logits_and_gradients_equal_each_record_alone_in_eager(family_models, family):
    path = family_models[family]
    ids, row = _row(300)
    logits, grads = _flattened(path, ids, row)
    ref_logits, ref_grads = _per_record_eager(path, ids)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert grads.keys() == ref_grads.keys()
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert worst < 1e-4, f"largest gradient difference {worst:.2e}"
    unwindowed, _ = _per_record_eager(path, ids, window=False)
    assert (unwindowed - ref_logits).abs().max().item() > 1e-3, "the records must be longer than the window"


def test_softcap_and_sinks_change_the_attention_they_are_honoured_in():
    """The per-record path applies softcapping and sinks (a function that ignored them would give these equal)."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention

    config = Gemma2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, layer_types=["full_attention"])
    module = Gemma2Attention(config, layer_idx=0).eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 20, 16, generator=g) * 3 for h in (4, 2, 2))
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    plain, _ = attention.varlen_rows_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu)
    capped, _ = attention.varlen_rows_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, softcap=1.0)
    assert (plain - capped).abs().max().item() > 1e-2


def test_a_whole_flattened_row_gets_no_dense_mask():
    """transformers would build a tokens x tokens mask for a flattened row; the attention bounds records itself."""
    assert attention.unmasked_rows(batch_size=1, q_length=4096, kv_length=4096) is None
    padded = attention.unmasked_rows(batch_size=2, q_length=5, kv_length=5,
                                     attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    assert padded.shape == (2, 1, 5, 5) and not padded[1, 0, 4, 0]  # padding still masked


def test_visible_is_transformers_sliding_window_mask():
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask, sliding_window_overlay

    ours = attention.visible(12, 12, 4, True, "cpu")
    theirs = sdpa_mask(batch_size=1, q_length=12, kv_length=12, allow_is_causal_skip=False,
                       mask_function=and_masks(causal_mask_function, sliding_window_overlay(4)))
    assert torch.equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_padding_free_training_of_a_sliding_window_model_runs_end_to_end(tmp_path, family_models, family):
    """The default batching trains a Gemma 3 / Mistral model on records past its window, through the trainer's own
    batches, with the attention proven above; the stage says which attention ran and with which window."""
    from sftflow.stage_summary import stage_summary
    from sftflow.tasks.training.train import train
    from sftflow.tasks.training.trainer import build_trainer

    path = family_models[family]
    recs = [make_record(i, "The movie was great and the acting was wonderful. " * (1 + i % 3), "POS")
            for i in range(12)]
    paths = template_splits(tmp_path, path, recs, recs[:2])["paths"]
    cfg = TrainConfig(method="lora", max_steps=2, batch_size=4, logging_steps=1)
    assert cfg.batching == "padding_free"
    trainer, params = build_trainer(paths, path, cfg, tmp_path / "probe")
    assert params["train.attention"] == f"{attention.NAME} (per-record sdpa; sliding window 8)"
    batch = next(iter(trainer.get_train_dataloader()))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert max(e - s for s, e in zip(starts, starts[1:])) > 8, "records must be longer than the window"
    model = trainer.model.eval()
    reference = _load(path, "eager").eval()
    with torch.no_grad():
        flat = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        alone = torch.cat([reference(input_ids=batch["input_ids"][:, s:e]).logits
                           for s, e in zip(starts, starts[1:])], dim=1)
    assert (flat - alone).abs().max().item() < 1e-4  # LoRA's B starts at zero: the same function as the base

    result = train(paths, path, cfg, tmp_path / "out")
    assert result["metrics"]["train/steps"] == 2
    line = stage_summary("train", result["metrics"], result["params"])
    assert line.startswith("2 steps") and line.endswith(f"attention {attention.NAME} (per-record sdpa; sliding window 8)")
