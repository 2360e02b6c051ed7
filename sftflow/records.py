"""The canonical record and JSONL helpers shared by every stage.

A record is a plain dict:
    {"id": str, "messages": [{"role": str, "content": str}, ...], "label": str | None,
     "source": str, "file": str, "index": int, "meta": dict}
plus "tools" (function schemas) when the row had any; turns may carry tool calls and reasoning
(tasks/data/shapes.py has their shape).
`file` is relative to data.root when under it; `index` is the 1-based line for JSONL files and the
0-based item position for JSON files. Plain dicts keep stages cheap to serialise between Prefect tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")


def record_id(source: str, file: str, index: int) -> str:
    return hashlib.sha256(f"{source}\0{file}\0{index}".encode()).hexdigest()[:16]


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False)
            try:
                fh.write(line + "\n")
            except UnicodeEncodeError:  # a lone surrogate (from undecodable input) is written escaped
                fh.write(json.dumps(row) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def reject(record: dict, stage: str, reason: str) -> dict:
    """A rejects-file row: why, where it came from, and the record itself."""
    return {"stage": stage, "reason": reason, "id": record.get("id"), "source": record.get("source"),
            "file": record.get("file"), "index": record.get("index"), "record": record}


def prompt_messages(record: dict) -> list[dict]:
    """Everything before the final assistant turn: what a model is asked at evaluation time."""
    msgs = record["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def label_of(record: dict) -> str | None:
    """What `curate.allowed_labels` checks: the label field, else the final assistant turn (stripped)."""
    if record.get("label") is not None:
        return record["label"]
    last = next((m for m in reversed(record["messages"]) if m["role"] == "assistant"), None)
    return None if last is None else last["content"].strip()


def reference(record: dict) -> str:
    """The expected answer: the label when present, else the final assistant turn."""
    if record.get("label") is not None:
        return record["label"]
    return record["messages"][-1]["content"]


def snippet(record: dict, width: int = 70) -> str:
    """The last user turn and the final turn, shortened: enough to recognise a record in a message."""
    msgs = record.get("messages") or []
    user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")

    def cut(text: str) -> str:
        text = text.strip()
        return repr(text if len(text) <= width else text[:width] + "...")

    return f"user: {cut(user)} -> {msgs[-1]['role']}: {cut(msgs[-1]['content'])}" if msgs else "(no messages)"
