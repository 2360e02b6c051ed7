"""Quality filters: a small registry of named rules, each `rule(record, tokens, cfg) -> bool` (True: reject).

Rules run in registry order and the first that fires is the record's reject reason, so every rule has
its own count. `tokens` is the record's templated token count from the pre-flight check (None when the
check is off, in which case the token rules do not apply).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache

from sftflow.configs.schema import CurateConfig
from sftflow.records import label_of

_WORD = re.compile(r"\w+")
_OK_CONTROL = {"\n", "\t", "\r"}


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for texts too short to judge)."""
    ws = _WORD.findall(text.lower())
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    return 0.0 if len(grams) < 8 else 1.0 - len(set(grams)) / len(grams)


def garbled(text: str) -> float:
    """Share of characters that are control, unassigned, private-use, surrogate or U+FFFD."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if ch == "\ufffd" or (ch not in _OK_CONTROL and
                                                     unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs")))
    return bad / len(text)


@lru_cache(maxsize=16)
def _patterns(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def _boilerplate(record: dict, cfg: CurateConfig) -> bool:
    pattern = _patterns(tuple(cfg.reject_patterns))
    return bool(pattern) and any(pattern.search(m["content"]) for m in record["messages"] if m["role"] == "assistant")


Rule = Callable[[dict, "int | None", CurateConfig], bool]

FILTERS: dict[str, Rule] = {
    # A turn that only calls a tool has no text to measure.
    "turn_too_short": lambda r, t, c: any(len(m["content"].strip()) < max(c.min_chars, 1) for m in r["messages"]
                                          if not m.get("tool_calls")),
    "too_many_chars": lambda r, t, c: sum(len(m["content"]) for m in r["messages"]) > c.max_chars,
    "too_few_tokens": lambda r, t, c: t is not None and t < c.min_tokens,
    "too_many_tokens": lambda r, t, c: t is not None and c.max_tokens is not None and t > c.max_tokens,
    "garbled": lambda r, t, c: any(garbled(m["content"]) > c.max_garbled for m in r["messages"]),
    "repetitive": lambda r, t, c: any(repetition(m["content"]) > c.max_repetition for m in r["messages"]),
    "boilerplate": lambda r, t, c: _boilerplate(r, c),
    "label_not_allowed": lambda r, t, c: c.allowed_labels is not None and label_of(r) not in c.allowed_labels,
}


def filter_reason(record: dict, cfg: CurateConfig, tokens: int | None = None) -> str | None:
    """The first quality rule a record breaks, or None."""
    return next((name for name, rule in FILTERS.items() if rule(record, tokens, cfg)), None)
