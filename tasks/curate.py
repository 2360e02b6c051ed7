"""Stage 2: quality filters and exact deduplication, every record accounted for.

records in = kept + rejected (one row per record in curate_rejects.jsonl, with the rule that fired).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from sftflow.configs.schema import CurateConfig
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.tracking import stage_task

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form used for exact dedup."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def content_key(record: dict) -> str:
    turns = [[m["role"], normalise(m["content"])] for m in record["messages"]]
    return hashlib.sha256(json.dumps(turns).encode()).hexdigest()


def filter_reason(record: dict, cfg: CurateConfig) -> str | None:
    """The first quality rule a record breaks, or None."""
    msgs = record["messages"]
    if msgs[-1]["role"] != "assistant":
        return "no_final_assistant_turn"
    if any(len(m["content"].strip()) < max(cfg.min_chars, 1) for m in msgs):
        return "turn_too_short"
    if sum(len(m["content"]) for m in msgs) > cfg.max_chars:
        return "too_long"
    if cfg.allowed_labels is not None and record.get("label") not in cfg.allowed_labels:
        return "label_not_allowed"
    return None


def curate(records_path: str, cfg: CurateConfig, out_dir: Path) -> dict:
    kept, rejects, first_seen = [], [], {}
    reasons: Counter[str] = Counter()
    n_in = 0
    for record in read_jsonl(Path(records_path)):
        n_in += 1
        reason = filter_reason(record, cfg)
        if reason is None and cfg.exact_dedup:
            key = content_key(record)
            if key in first_seen:
                reason = "exact_duplicate"
                record = {**record, "meta": {**record["meta"], "duplicate_of": first_seen[key]}}
            else:
                first_seen[key] = record["id"]
        if reason:
            reasons[reason] += 1
            rejects.append(reject(record, "curate", reason))
        else:
            kept.append(record)
    assert n_in == len(kept) + len(rejects), "curation accounting does not add up"

    write_jsonl(out_dir / "curated.jsonl", kept)
    write_jsonl(out_dir / "curate_rejects.jsonl", rejects)
    counts = {"records_in": n_in, "kept": len(kept), "rejected": len(rejects), "by_reason": dict(reasons)}
    (out_dir / "curation_counts.json").write_text(json.dumps(counts, indent=2))
    metrics = {"curate/records_in": n_in, "curate/kept": len(kept), "curate/rejected": len(rejects)}
    metrics.update({f"curate/rejected/{r}": c for r, c in reasons.items()})
    return {"records": str(out_dir / "curated.jsonl"), "counts": counts, "metrics": metrics,
            "artifacts": [out_dir / "curation_counts.json", out_dir / "curate_rejects.jsonl"]}


curate_task = stage_task(curate, "curate")
