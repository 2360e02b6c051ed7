"""Held-out tool calling: is a record's first tool call what the model generates when asked at that point?

The prompt is the conversation before the first assistant turn that calls a tool; the reference is that turn
as the chat template renders it (name, arguments and the template's call markup), compared with the
generation after special tokens are dropped and whitespace is collapsed. `tool_call_acc` is the share of
records with a call whose call is generated exactly.
"""

from __future__ import annotations

from sftflow.tasks.training.chat import chat_messages
from sftflow.tasks.training.template import render, with_system


def _plain(tok, text: str) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return " ".join(tok.decode(ids, skip_special_tokens=True).split())


def first_calls(tok, records: list[dict], system_prompt: str | None) -> list[tuple[int, list[dict], str]]:
    """(record index, the turns before its first call, that call as rendered) of each record with a call."""
    out = []
    for i, r in enumerate(records):
        msgs = chat_messages(with_system(r["messages"], system_prompt), "keep", tok.chat_template)
        k = next((j for j, m in enumerate(msgs) if m["role"] == "assistant" and m.get("tool_calls")), None)
        if k is None:
            continue
        prefix = render(tok, msgs[:k], add_generation_prompt=True, tools=r.get("tools"))
        through = render(tok, msgs[: k + 1], tools=r.get("tools"))
        start = next((n for n, (a, b) in enumerate(zip(prefix, through)) if a != b), len(prefix))
        out.append((i, msgs[:k], _plain(tok, through[start:])))
    return out


def call_matches(tok, predictions: list[str], expected: list[str]) -> list[float]:
    return [float(_plain(tok, p) == e) for p, e in zip(predictions, expected)]
