"""Attention for padding-free and packed rows: each record attends only to itself, at its own cost, with every
variant its model family uses (sliding windows per layer, logit softcapping, attention sinks).

A flattened row holds several records, told apart by the sequence boundaries TRL's collator passes along
(`cu_seq_lens_q`, `max_length_q`). Plain sdpa would attend over the whole row under a block-diagonal mask, paying
(nL)^2 scores for n records of length L instead of n*L^2 (the demo model, a LoRA step on a row of 8 records, 887
tokens: 4.5 s with sdpa's mask, 3.8 s per record). `choose` picks, for the device the model trains on:

- `flash_attention_2` (transformers' own integration of flash-attn's varlen kernel, which honours windows and
  softcapping) on CUDA when flash-attn is installed, unless the model has attention sinks, which it would drop;
- `varlen_rows` otherwise: one launch of PyTorch's varlen kernel for the whole row (CUDA, half precision, causal,
  sliding window as its window_size); else each record alone: through sdpa with a causal (and, past the window,
  sliding) mask, or through the family's own eager attention when the layer softcaps logits or has sinks, which
  sdpa cannot express. Anything that is not a whole flattened row (padded batches, generation with a KV cache)
  gets transformers' sdpa mask, and the same sdpa-or-eager choice.

Nothing here is silently approximate: a variant the fast paths cannot express sends the layer to a path that can.
"""

from __future__ import annotations

import functools
import inspect
import sys

from sftflow import precision as prec

# Not "sdpa_*": transformers treats any name containing "sdpa" as sdpa and refuses families without sdpa support
# (Gemma 2, gpt-oss), which the per-record eager path serves.
NAME = "varlen_rows"


@functools.cache
def _varlen_params() -> frozenset[str]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def _has_torch_varlen() -> bool:
    return "window_size" in _varlen_params()


def _torch_varlen(q, k, v, cu_seqlens, max_len, scale, window=None):
    """PyTorch's fused varlen kernel (CUDA, fp16/bf16). window_size (left, 0) is causal with `left` earlier tokens
    visible: a window of w tokens (transformers: kv > q - w) is (w - 1, 0)."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale,
                       window_size=(window - 1 if window else -1, 0), **gqa)


def fused(device, dtype) -> bool:
    """Whether rows on this device in this dtype run PyTorch's fused varlen kernel (sftflow.precision decides:
    CUDA 8.0+, half precision)."""
    import torch

    if device.type != "cuda":  # asked in every layer's forward: no card to look up on a CPU
        return False
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    kernel = prec.attention_kernel("padding_free", prec.current_card(device), half, flash_installed=False,
                                   torch_varlen_available=_has_torch_varlen())
    return kernel == prec.TORCH_VARLEN


def needs_eager(softcap=None, s_aux=None) -> bool:
    """Logit softcapping and attention sinks change the softmax itself: neither sdpa nor the varlen kernel has them."""
    return softcap is not None or s_aux is not None


def varlen_rows_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                        cu_seq_lens_k=None, max_length_q=None, sliding_window=None, softcap=None, s_aux=None,
                        **kwargs):
    """query/key/value: (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim), like every HF attention."""
    import torch

    bounds = _row_bounds(query, key, attention_mask, cu_seq_lens_q, kwargs.get("position_ids"))
    variants = {"sliding_window": sliding_window, "softcap": softcap, "s_aux": s_aux}
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if bounds is None:
        return _masked(module, query, key, value, attention_mask, dropout, scaling, variants, causal, **kwargs), None
    dtype = torch.get_autocast_dtype("cuda") if query.is_cuda and torch.is_autocast_enabled("cuda") else query.dtype
    # The fused kernel has no attention dropout, softcap or sinks, and is causal only.
    if not dropout and not needs_eager(softcap, s_aux) and causal and fused(query.device, dtype):
        return flat_attention(query, key, value, bounds, max_length_q, scaling, _torch_varlen, dtype,
                              sliding_window), None
    edges = bounds.tolist()
    parts = [_one_record(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout, scaling, variants,
                         causal, **kwargs) for s, e in zip(edges, edges[1:]) if e > s]
    return torch.cat(parts, dim=1), None


def _row_bounds(query, key, attention_mask, cu_seq_lens, position_ids):
    """The records' boundaries when this call is one whole flattened row (batch 1, no cache), else None. Without
    the collator's cu_seq_lens (the mask function left the row unmasked) they come from where positions restart."""
    import torch

    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if cu_seq_lens is not None:  # self-attention without a cache: the key boundaries are the query's
        return cu_seq_lens
    if attention_mask is not None:
        return None
    n = query.shape[2]
    positions = position_ids.reshape(-1) if position_ids is not None else None
    if positions is None or positions.numel() != n:
        return torch.tensor([0, n], device=query.device)
    restarts = (positions[1:] - positions[:-1] != 1).nonzero().flatten() + 1
    return torch.cat([restarts.new_zeros(1), restarts, restarts.new_tensor([n])])


def visible(q_len: int, k_len: int, window: int | None, causal: bool, device):
    """Bool (1, 1, q_len, k_len), True where query i (the last q_len of k_len positions) may see key j: j <= i
    when causal, and within the window of `window` tokens (transformers' kv > q - window)."""
    import torch

    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    seen = k <= q if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if window is not None:
        seen = seen & ((q - k < window) if causal else ((q - k).abs() < window))
    return seen[None, None]


def _one_record(module, q, k, v, dropout, scaling, variants, causal, **kwargs):
    """One record alone: sdpa (causal, or its window as a mask), or the family's eager attention for softcap/sinks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, window = q.shape[2], variants["sliding_window"]
    windowed = window is not None and n > window
    if needs_eager(variants["softcap"], variants["s_aux"]):
        return _eager(module, q, k, v, visible(n, n, window if windowed else None, causal, q.device), dropout,
                      scaling, variants, **kwargs)
    mask = visible(n, n, window, causal, q.device) if windowed else None
    return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and mask is None, **kwargs)[0]


def _masked(module, query, key, value, attention_mask, dropout, scaling, variants, causal, **kwargs):
    """Not a whole flattened row: transformers' own mask (padding, window, cache offset) with sdpa, or eager when
    the layer softcaps or has sinks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not needs_eager(variants["softcap"], variants["s_aux"]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)[0]
    if attention_mask is None:  # sdpa's mask skipped as plain causal: eager needs it spelled out
        attention_mask = visible(query.shape[2], key.shape[2], variants["sliding_window"], causal, query.device)
    return _eager(module, query, key, value, attention_mask, dropout, scaling, variants, **kwargs)


def _eager(module, q, k, v, mask, dropout, scaling, variants, **kwargs):
    """The model family's own eager attention (it knows its softcap and sinks) under a bool mask, made additive."""
    import torch

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__}: attention with {_named(variants)} needs the model "
                                  "family's eager_attention_forward, which its module does not define; train with "
                                  "train.batching: padded")
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    return eager(module, q, k, v, mask, dropout=dropout, scaling=scaling, **variants, **kwargs)[0]


def _named(variants: dict) -> str:
    return ", ".join(k for k, v in variants.items() if v is not None) or "no variant"


def flat_attention(query, key, value, cu_seq_lens, max_length, scaling, kernel, dtype, window=None):
    """A whole flattened row through a varlen `kernel` taking (tokens, heads, dim) q and kv (kv heads shared when
    fewer: the kernel's enable_gqa, else expanded), cast to `dtype` (rotary embeddings leave q/k in fp32 under
    autocast; the kernel, like sdpa under autocast, runs in the autocast dtype) -> (1, tokens, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    if kernel is not _torch_varlen or "enable_gqa" not in _varlen_params():
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    max_len = int(max_length) if max_length is not None else int(cu_seq_lens.diff().max())
    return kernel(q, k, v, cu_seq_lens.to(torch.int32), max_len, scaling, window).unsqueeze(0)


def unmasked_rows(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, attention_mask=None,
                  **kwargs):
    """The mask function for `varlen_rows`: no mask for one unpadded row seen whole without a cache (the attention
    bounds each record itself; transformers would build a tokens x tokens mask for it, 1 GiB at 32k tokens, only
    to have it ignored); transformers' sdpa mask for anything else."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        if batch_size == 1 and q_length is not None and q_length == kv_length and not q_offset and not kv_offset:
            return None
    else:  # a mask given stays a mask: only a missing one lets the attention find records from restarting positions
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `attn_implementation="varlen_rows"` loadable (idempotent); -> the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_rows_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, unmasked_rows)
    return NAME


def has_sinks(config) -> bool:
    """Attention sinks (gpt-oss): a learned logit per head joins each softmax; flash-attn 2 has no such input."""
    return config is not None and config.get_text_config().model_type in {"gpt_oss"}


def choose(batching: str, cuda: bool, config=None, precision: str | None = None) -> str | None:
    """The attn_implementation to load a training model with, for this batching on this device in this training
    precision (default: what 'auto' resolves to); sftflow.precision.attention_kernel decides. None for padded
    batches: the family's default (sdpa, or eager where the family has no sdpa support), as TRL would load it.
    Never flash-attn 2 for a model with sinks: it would drop them."""
    card = prec.current_card() if cuda else prec.CPU
    flash = False
    if card.cuda and not has_sinks(config):
        from transformers.utils import is_flash_attn_2_available

        flash = is_flash_attn_2_available()
    kernel = prec.attention_kernel(batching, card, precision or prec.training_precision("auto", card), flash,
                                   _has_torch_varlen())
    return None if kernel == prec.SDPA else kernel if kernel == prec.FLASH else register()


def layer_variants(model) -> dict:
    """{variant: value} the model's attention layers use (sliding windows per layer type, softcap, sinks)."""
    cfg = model.config.get_text_config()
    found = {}
    types = set(getattr(cfg, "layer_types", None) or [])
    window = getattr(cfg, "sliding_window", None)
    if window and (not types or "sliding_attention" in types) and getattr(cfg, "use_sliding_window", True):
        found["sliding window"] = window
    if getattr(cfg, "attn_logit_softcapping", None):
        found["logit softcap"] = cfg.attn_logit_softcapping
    if has_sinks(model.config):
        found["sinks"] = True
    return found


def describe(model, precision: str, device=None) -> str:
    """What a loaded model's attention runs in this precision on `device` (the trainer's: the trainer moves the
    weights after loading, FSDP only when training starts; default where the weights are), e.g. 'varlen_rows
    (torch varlen kernel; sliding window 512)'."""
    import torch

    impl = model.config._attn_implementation
    variants = layer_variants(model)
    spelled = "; " + ", ".join(k if v is True else f"{k} {v}" for k, v in variants.items()) if variants else ""
    if impl != NAME:
        return f"{impl}{f' ({spelled[2:]})' if spelled else ''}"
    device = device if device is not None else next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    eager = "logit softcap" in variants or "sinks" in variants
    path = "per-record eager" if eager else "torch varlen kernel" if fused(device, dtype) else "per-record sdpa"
    return f"{NAME} ({path}{spelled})"
