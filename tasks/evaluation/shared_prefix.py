"""Generation for prompts that share a long prefix, computing the prefix once.

Few-shot prompts (BBH: a subtask's description and 3 examples, 53% of its prompt tokens with 3 items a subtask) and
held-out prompts (the system prompt and a source's task definition, about half of a review prompt) repeat the same
opening for every item. Its keys and values are computed once per group of prompts; each batch of the group
continues from a copy of them, the rest of each prompt left-padded after the prefix. Greedy outputs are those of
generating from the whole prompts (tests/test_shared_prefix.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

MIN_PREFIX = 32  # tokens shared: below this, computing the prefix again for each batch costs little


def prefix_groups(encoded: list[list[int]], min_prefix: int = MIN_PREFIX) -> list[tuple[int, list[int]]]:
    """Prompts (token ids) -> [(shared prefix length, indices)]: neighbours in sorted order grouped while they
    share >= min_prefix tokens; a prefix stops at least one token short of each of its prompts, so each keeps a
    token to feed. The prompts that share no long prefix come last, together, with prefix length 0."""
    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(encoded)), key=lambda i: encoded[i]):
        if groups:
            length, members = groups[-1]
            first = encoded[members[0]]
            limit = length if len(members) > 1 else len(first) - 1
            shared = min(_common(first, encoded[i], limit), len(encoded[i]) - 1)
            if shared >= min_prefix:
                groups[-1] = (shared, members + [i])
                continue
        groups.append((0, [i]))
    alone = sorted(members[0] for _, members in groups if len(members) == 1)
    return [g for g in groups if len(g[1]) > 1] + ([(0, alone)] if alone else [])


def _common(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common start of a and b, at most `limit`."""
    n = 0
    while n < limit and n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def cache_name() -> str:
    """What generate() and model outputs call the key/value cache: `cache` in recent transformers releases, before
    `past_key_values` (still accepted there, with a deprecation warning)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def generate_after_prefix(model, prompts: list[list[int]], length: int, batch_size: int, pad_id: int,
                          generate: Callable) -> list[list[int]]:
    """New tokens of each prompt's completion; the prompts share their first `length` tokens (0: nothing is
    cached). Batches of similar length; generate(input_ids, attention_mask, **cache) -> input and new ids."""
    import torch

    prefix = torch.tensor([prompts[0][:length]], dtype=torch.long, device=model.device)
    cache = None
    if length:
        with torch.no_grad():
            cache = getattr(model(prefix, use_cache=True), cache_name(), None)
        if not hasattr(cache, "batch_repeat_interleave"):  # a model without a copyable cache: whole prompts, uncached
            cache = None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    new: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rests = [prompts[i][length:] for i in batch]
        width = max(map(len, rests))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rests], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=model.device)
        reuse = {}
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
            reuse = {cache_name(): past}
        context = torch.cat([prefix.expand(len(batch), -1), ids], dim=1)
        attention = torch.cat([torch.ones_like(prefix).expand(len(batch), -1), mask], dim=1)
        with torch.no_grad():
            out = generate(context, attention, **reuse)
        for i, tokens in zip(batch, out[:, context.shape[1]:].tolist()):
            new[i] = tokens
    return [new[i] for i in range(len(prompts))]
