"""Attention for padding-free and packed rows: each record attends only to itself, at its own cost.

A flattened row holds several records, told apart by the sequence boundaries TRL's collator passes along
(`cu_seq_lens_q`, `max_length_q`). Plain sdpa would attend over the whole row under a block-diagonal mask, paying
(nL)^2 scores for n records of length L instead of n*L^2 (the demo model, a LoRA step on a row of 8 records, 887
tokens: 4.5 s with sdpa's mask, 3.8 s per record). `choose` picks, for the device the model trains on:

- `flash_attention_2` (transformers' own integration of flash-attn's varlen kernel) on CUDA when flash-attn is
  installed (`pip install 'sftflow[flash]'`);
- `sdpa_varlen` otherwise: on CUDA in half precision, PyTorch's own varlen kernel (`torch.nn.attention.varlen`,
  one launch for the whole row, through `flat_attention`); on CPU (or fp32, or with attention dropout), sdpa once
  per record with a causal mask, which is exactly that block diagonal. Anything that is not a whole flattened row
  (padded batches, generation with a KV cache) falls back to plain sdpa.
"""

from __future__ import annotations

import inspect

from sftflow import precision as prec

NAME = "sdpa_varlen"


def _torch_varlen(q, k, v, cu_seqlens, max_len, scale):
    """PyTorch's fused varlen kernel (CUDA, fp16/bf16); (-1, 0) is its causal window."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, window_size=(-1, 0))


def fused(device, dtype) -> bool:
    """Whether rows on this device in this dtype run PyTorch's fused varlen kernel (sftflow.precision decides:
    CUDA 8.0+, half precision)."""
    import torch

    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    kernel = prec.attention_kernel("padding_free", prec.current_card(device), half, flash_installed=False,
                                   torch_varlen_available=_has_torch_varlen())
    return kernel == prec.TORCH_VARLEN


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, **kwargs):
    """query/key/value: (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim), like every HF attention."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    whole_row = (cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
                 and (cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
                      or torch.equal(cu_seq_lens_q, cu_seq_lens_k)))
    if not whole_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dtype = torch.get_autocast_dtype("cuda") if query.is_cuda and torch.is_autocast_enabled("cuda") else query.dtype
    if not dropout and fused(query.device, dtype):  # the fused kernel has no attention dropout
        return flat_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling, _torch_varlen, dtype), None
    # Each record through transformers' sdpa: its grouped-query path shares kv heads without copying them
    # (expanding them for the whole row, as the fused kernel needs, measured 1.5-1.7x slower here).
    bounds = cu_seq_lens_q.tolist()
    parts = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                    dropout=dropout, scaling=scaling, is_causal=True)[0]
             for s, e in zip(bounds, bounds[1:]) if e > s]
    return torch.cat(parts, dim=1), None


def flat_attention(query, key, value, cu_seq_lens, max_length, scaling, kernel, dtype):
    """A whole flattened row through a varlen `kernel` taking (tokens, heads, dim) with equal head counts:
    kv heads expanded for grouped-query attention, cast to `dtype` (rotary embeddings leave q/k in fp32 under
    autocast; the kernel, like sdpa under autocast, runs in the autocast dtype) -> (1, tokens, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    max_len = int(max_length) if max_length is not None else int(cu_seq_lens.diff().max())
    return kernel(q, k, v, cu_seq_lens.to(torch.int32), max_len, scaling).unsqueeze(0)


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` loadable (idempotent); -> the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded batches still need sdpa's mask
    return NAME


def choose(batching: str, cuda: bool, precision: str | None = None) -> str:
    """The attn_implementation to load a training model with, for this batching on this device in this training
    precision (default: what 'auto' resolves to); sftflow.precision.attention_kernel decides."""
    card = prec.current_card() if cuda else prec.CPU
    flash = False
    if card.cuda:
        from transformers.utils import is_flash_attn_2_available

        flash = is_flash_attn_2_available()
    kernel = prec.attention_kernel(batching, card, precision or prec.training_precision("auto", card), flash,
                                   _has_torch_varlen())
    return kernel if kernel in (prec.SDPA, prec.FLASH) else register()


def describe(model, precision: str) -> str:
    """What a loaded model's attention runs in this precision, e.g. 'sdpa_varlen (torch varlen kernel)'."""
    import torch

    impl = model.config._attn_implementation
    if impl != NAME:
        return impl
    param = next(model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, param.dtype)
    return f"{NAME} ({'torch varlen kernel' if fused(param.device, dtype) else 'per-record sdpa'})"
