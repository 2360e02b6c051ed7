"""Per-model, per-record store of held-out generations.

A model's key covers what decides its greedy outputs (content digest, tokenizer, generation settings, system
prompt, precision, library versions); a record's key covers its turns and tools verbatim. Each run that
generates publishes one cache entry, `<state>/cache/heldout-items/<model key>-<digest of its record keys>/`,
holding only the records it generated; a model's outputs are the union of its intact entries. A damaged
entry is discarded by the cache's own checks and its records count as misses.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version

from sftflow import cache, env, precision
from sftflow.configs.schema import HeldoutConfig
from sftflow.models import tokenizer_digest
from sftflow.records import read_jsonl, write_jsonl
from sftflow.results import ModelRef

STAGE = "heldout-items"
FORMAT = 1  # bump when a row's fields or their meaning change, so older entries are not read
ITEMS = "items.jsonl"


def model_key(spec: ModelRef, cfg: HeldoutConfig, system_prompt: str | None, chat_tokenizer: str | None) -> str | None:
    """None for a model without a content digest (a hub id's files can change under it): never cached."""
    digest = spec.get("digest")
    if not digest or digest.startswith("hub:"):
        return None
    libs = {lib: version(lib) for lib in ("torch", "transformers", "peft")}
    return cache.key(STAGE, FORMAT, digest, tokenizer_digest(chat_tokenizer or spec.get("adapter") or spec["path"]),
                     {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}, system_prompt,
                     precision.inference(), libs)


def item_key(record: dict) -> str:
    # Verbatim, not dedup's normalised content_key: prompts differing only in case or spacing generate differently.
    blob = json.dumps([record["messages"], record.get("tools")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read(key: str) -> dict[str, dict]:
    """{record key: row} over every intact entry of one model."""
    rows: dict[str, dict] = {}
    for folder in sorted((env.state_dir() / "cache" / STAGE).glob(f"{key}-*")):
        if (hit := cache.lookup(STAGE, folder.name)) is not None:  # checks the manifest, discards damage
            rows.update((row.pop("item"), row) for row in read_jsonl(hit / ITEMS))
    return rows


def write(key: str, rows: dict[str, dict]) -> None:
    """Publish newly generated rows ({record key: row}) as one entry of the model."""
    if not rows:
        return
    items = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:32]
    with cache.fill(STAGE, f"{key}-{items}") as entry:
        write_jsonl(entry / ITEMS, [{"item": k, **row} for k, row in rows.items()])
