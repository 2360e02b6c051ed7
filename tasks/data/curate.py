"""Stage 2: pre-flight check, quality filters, exact and near dedup; every record accounted for.

records in = kept + rejected (pre-flight and filters) + exact duplicates + near duplicates, asserted.
Each removed record is one row of curate_rejects.jsonl with the rule that fired and its provenance;
duplicates name their keeper. A rule that removes more than half of the data (load rejects included)
is named with its count and an example in the counts, the report and the empty-split error.
Cached by the content of the input and tokenizer and the config.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sftflow import cache
from sftflow.cache import cached
from sftflow.configs.schema import CurateConfig
from sftflow.records import read_jsonl, reject, snippet, write_jsonl
from sftflow.results import Curated
from sftflow.tasks.data.dedup import exact, minhash
from sftflow.tasks.data.filters import filter_reason
from sftflow.tasks.data.preflight import preflight, tokenizer_files
from sftflow.tracking import stage

REMOVED = ("rejected", "exact_dup", "near_dup")


def dedup_text(record: dict) -> str:
    """What near dedup compares: the conversation without its system prompt."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")


def cluster_report(records: list[dict], near: minhash.NearDuplicates, examples: int = 20) -> dict:
    sizes = Counter(len(c) for c in near.clusters)
    return {**near.stats, "size_histogram": {str(k): v for k, v in sorted(sizes.items())},
            "largest": [{"keeper": min(records[i]["id"] for i in c), "size": len(c),
                         "members": [{"id": records[i]["id"], "source": records[i]["source"],
                                      "file": records[i]["file"], "index": records[i]["index"],
                                      "text": dedup_text(records[i])[:300]} for i in c[:3]]}
                        for c in near.clusters[:examples]]}


# Where to look when one rule removes most of the data.
HINTS = {"label_not_allowed": "curate.allowed_labels, checked against `label`, else the final assistant turn",
         "turn_too_short": "curate.min_chars", "too_many_chars": "curate.max_chars",
         "too_few_tokens": "curate.min_tokens", "too_many_tokens": "curate.max_tokens",
         "garbled": "curate.max_garbled", "repetitive": "curate.max_repetition",
         "boilerplate": "curate.reject_patterns",
         "oversize": "curate.max_record_bytes"}


def dominant_rules(records: list[dict], reasons: dict[str, str], load_rejects: list[dict]) -> list[dict]:
    """Rules (load reasons included) that removed more than half of all records in, each with an example."""
    total = len(records) + len(load_rejects)
    examples: dict[str, dict] = {}
    counts: Counter = Counter()
    for row in load_rejects:
        kind = row["reason"].split(":", 1)[0]
        counts[kind] += 1
        examples.setdefault(kind, {"id": row["id"], "file": row["file"], "index": row["index"],
                                   "text": str(row["record"].get("raw", ""))[:140]})
    for r in records:
        if rule := reasons.get(r["id"]):
            counts[rule] += 1
            examples.setdefault(rule, {"id": r["id"], "file": r["file"], "index": r["index"], "text": snippet(r)})
    return [{"rule": rule, "count": n, "records_in": total, "hint": HINTS.get(rule.removeprefix("preflight:"), ""),
             "example": examples[rule]} for rule, n in counts.most_common() if n * 2 > total]


def _curate(records_path: str, cfg: CurateConfig, out_dir: Path, tokenizer: str | None, max_length: int,
            system_prompt: str | None, load_rejects_path: str | None) -> dict:
    records = list(read_jsonl(Path(records_path)))
    load_rejects = list(read_jsonl(Path(load_rejects_path))) if load_rejects_path else []
    errors, tokens, pre_report = preflight(records, cfg.preflight, tokenizer, max_length, system_prompt, load_rejects)
    reasons: dict[str, str] = {}  # id -> why it goes
    duplicate_of: dict[str, str] = {}
    for r in records:
        why = f"preflight:{errors[r['id']]}" if r["id"] in errors else filter_reason(r, cfg, tokens.get(r["id"]))
        if why:
            reasons[r["id"]] = why
    survivors = [r for r in records if r["id"] not in reasons]
    if cfg.exact_dedup:
        for dup, keep in exact.duplicates(survivors).items():
            reasons[dup], duplicate_of[dup] = "exact_duplicate", keep
        survivors = [r for r in survivors if r["id"] not in reasons]
    clusters = None
    cluster_of: dict[str, str] = {}
    if cfg.near_dedup.enabled and survivors:
        near = minhash.near_duplicates([dedup_text(r) for r in survivors], [r["id"] for r in survivors], cfg.near_dedup)
        clusters = cluster_report(survivors, near)
        for c in near.clusters:
            keep = min(survivors[i]["id"] for i in c)
            cluster_of.update({survivors[i]["id"]: keep for i in c})
        if cfg.near_dedup.remove:
            for dup, keep in near.keeper.items():
                reasons[dup], duplicate_of[dup] = "near_duplicate", keep

    kept, rejects = [], []
    for r in records:
        meta = {**r["meta"], **({"near_dup_cluster": cluster_of[r["id"]]} if r["id"] in cluster_of else {}),
                **({"duplicate_of": duplicate_of[r["id"]]} if r["id"] in duplicate_of else {}),
                **({"tokens": tokens[r["id"]]} if r["id"] in tokens else {})}
        r = {**r, "meta": meta}
        if r["id"] in reasons:
            rejects.append(reject(r, "curate", reasons[r["id"]]))
        else:
            kept.append(r)
    by_reason = Counter(reasons.values())
    counts = {"records_in": len(records), "kept": len(kept),
              "exact_dup": by_reason["exact_duplicate"], "near_dup": by_reason["near_duplicate"]}
    counts["rejected"] = len(reasons) - counts["exact_dup"] - counts["near_dup"]
    counts["by_reason"] = dict(sorted(by_reason.items()))
    counts["dominant"] = dominant_rules(records, reasons, load_rejects)
    assert counts["records_in"] == counts["kept"] + sum(counts[k] for k in REMOVED), f"accounting: {counts}"

    write_jsonl(out_dir / "curated.jsonl", kept)
    write_jsonl(out_dir / "curate_rejects.jsonl", rejects)
    (out_dir / "curation_counts.json").write_text(json.dumps(counts, indent=2))
    (out_dir / "preflight.json").write_text(json.dumps(pre_report, indent=2))
    (out_dir / "near_dup_clusters.json").write_text(json.dumps(clusters, indent=2, ensure_ascii=False))
    metrics = {"curate/records_in": len(records), **{f"curate/{k}": counts[k] for k in ("kept", *REMOVED)},
               **{f"curate/removed/{r.replace(':', '/')}": c for r, c in by_reason.items()},
               "preflight/error_share": pre_report["error_share"]}
    if "tokens" in pre_report:
        metrics.update({"preflight/tokens_total": pre_report["tokens"]["total"],
                        "preflight/over_max_length_share": pre_report["tokens"]["over_max_length_share"]})
    if clusters:
        metrics.update({"near_dedup/clusters": clusters["clusters"],
                        "near_dedup/clustered": clusters["clustered_records"]})
    return {"records": str(out_dir / "curated.jsonl"), "counts": counts, "metrics": metrics,
            "ledger": {**counts, "preflight": pre_report, "near_dedup": clusters},
            "artifacts": [out_dir / n for n in ("curation_counts.json", "preflight.json", "near_dup_clusters.json",
                                                "curate_rejects.jsonl")]}


@stage("curate")
def curate(records_path: str, cfg: CurateConfig, out_dir: Path, tokenizer: str | None = None, max_length: int = 512,
           system_prompt: str | None = None, load_rejects: str | None = None) -> Curated:
    """Curate `records_path` (load's records.jsonl); `tokenizer` (the base model's folder) enables token counts;
    `load_rejects` (load's load_rejects.jsonl) counts toward the pre-flight error share and is listed in its error."""
    key = cache.key("curate-v2", Path(records_path), cfg, tokenizer_files(tokenizer), max_length, system_prompt,
                    Path(load_rejects) if load_rejects else None)
    return cached("curate", key, out_dir, lambda d: _curate(records_path, cfg, d, tokenizer, max_length,
                                                            system_prompt, load_rejects))
