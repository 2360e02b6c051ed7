"""Exact dedup: records whose turns are equal after normalisation (case, width, whitespace)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form used for exact dedup."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def content_key(record: dict) -> str:
    # Calls and reasoning are part of a turn: two records that differ only there are not duplicates.
    extras = ("tool_calls", "reasoning_content")
    turns = [[m["role"], normalise(m["content"]), *(json.dumps(m[k], sort_keys=True) for k in extras if k in m)]
             for m in record["messages"]]
    return hashlib.sha256(json.dumps(turns).encode()).hexdigest()


def duplicates(records: list[dict]) -> dict[str, str]:
    """{id of a duplicate: id of its keeper}; the keeper of each group is its lowest id."""
    keys = [content_key(r) for r in records]
    keeper: dict[str, str] = {}
    for r, k in zip(records, keys):
        keeper[k] = min(keeper.get(k, r["id"]), r["id"])
    return {r["id"]: keeper[k] for r, k in zip(records, keys) if keeper[k] != r["id"]}
