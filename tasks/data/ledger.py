"""The data stage's ledger (every record in is kept or removed by a named rule, asserted) and the curation
report (markdown: MLflow artifact, Prefect artifact, `sftflow curate` output)."""

from __future__ import annotations

from sftflow.records import snippet


def account(upstream: dict, curated: int, parts: dict, contaminated: int, bridged: int = 0) -> dict:
    """The data stage's ledger; raises if any record is unaccounted for."""
    c = upstream.get("curate", {})
    ledger = {"records_in": upstream.get("load", {}).get("rows", curated), "kept": sum(len(p) for p in parts.values()),
              "rejected": upstream.get("load", {}).get("rejected", 0) + c.get("rejected", 0),
              "exact_dup": c.get("exact_dup", 0), "near_dup": c.get("near_dup", 0), "contaminated": contaminated, "bridged": bridged}
    total = sum(ledger[k] for k in ("kept", "rejected", "exact_dup", "near_dup", "contaminated", "bridged"))
    if upstream and total != ledger["records_in"]:
        raise AssertionError(f"data accounting does not add up: {ledger} (sum {total})")
    return ledger


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def dominant_lines(upstream: dict, contaminated: list[dict] | None = None) -> list[str]:
    """One line per rule that removed more than half of the data: rule, count, where to look, an example."""
    rules = list((upstream.get("curate") or {}).get("dominant") or [])
    records_in = upstream.get("load", {}).get("rows") or (rules[0]["records_in"] if rules else 0)
    if records_in and contaminated and len(contaminated) * 2 > records_in:
        first = contaminated[0]
        rules.append({"rule": "contaminated", "count": len(contaminated), "records_in": records_in,
                      "hint": "split.decontam", "example": {"id": first["id"], "file": first["file"],
                                                            "index": first["index"], "text": snippet(first["record"])}})
    out = []
    for d in rules:
        e = d["example"]
        hint = f" (see {d['hint']})" if d.get("hint") else ""
        out.append(f"rule {d['rule']} removed {d['count']} of {d['records_in']} records{hint}, "
                   f"e.g. {e['id']} at {e['file']}:{e['index']}: {e['text']}")
    return out


def markdown(report: dict) -> str:
    a = report["accounting"]
    splits = report["splits"]
    kept = ", ".join(f"{n} {s['count']}" for n, s in splits.items())
    lines = ["## Data curation", "",
             f"**{a['records_in']}** records in = **{a['kept']}** kept "
             f"({kept}) + {a['rejected']} rejected + "
             f"{a['exact_dup']} exact duplicates + {a['near_dup']} near duplicates + "
             f"{a['contaminated']} contaminated" + (f" + {a['bridged']} bridging earlier splits" if a.get("bridged")
                                                    else ""), ""]
    if report.get("dominant"):
        lines += ["### Warning: one rule removed most of the data", "", *(f"- {line}" for line in report["dominant"]),
                  ""]
    load = report.get("load", {})
    if load.get("per_source"):
        lines += ["### Sources", "", *_table(["source", "available", "loaded", "unreadable"],
                                             [[k, v["available"], v["loaded"], v["rejected"]]
                                              for k, v in load["per_source"].items()]), ""]
    cur = report.get("curate", {})
    pre = cur.get("preflight") or {}
    if pre:
        lines += ["### Pre-flight", "", f"error share {pre['error_share']:.2%} (limit {pre['max_error_share']:.0%}); "
                  f"errors by rule: {pre['by_rule'] or 'none'}"]
        if "tokens" in pre:
            t = pre["tokens"]
            lines += ["", f"templated tokens: total {t['total']}, mean {t['mean']:.1f}, median {t['p50']:.0f}, "
                      f"p95 {t['p95']:.0f}, max {t['max']}; {t['over_max_length']} records "
                      f"({t['over_max_length_share']:.1%}) longer than max_length {t['max_length']}"]
        lines.append("")
    if load.get("by_reason"):
        lines += ["### Unreadable rows by reason", "", *_table(["reason", "rows"], sorted(load["by_reason"].items())),
                  "", "each is in `load_rejects.jsonl` with its file:line", ""]
    if cur.get("by_reason"):
        lines += ["### Removed by rule", "", *_table(["rule", "records"], sorted(cur["by_reason"].items())), ""]
    near = cur.get("near_dedup") or {}
    if near:
        lines += ["### Near-duplicate clusters", "",
                  f"{near['clusters']} clusters holding {near['clustered_records']} records (MinHash LSH, "
                  f"{near['bands']} bands x {near['rows']} rows); sizes: {near['size_histogram'] or 'none'}", ""]
        for c in near["largest"][:5]:
            lines.append(f"- keeper `{c['keeper']}`, {c['size']} records: " +
                         "; ".join(f"`{m['id']}` {m['text'][:80]!r}" for m in c["members"]))
        lines.append("")
    dec = report.get("decontamination") or {}
    if dec:
        lines += ["### Decontamination", "",
                  f"{dec['benchmark_items']} benchmark items indexed ({', '.join(dec['benchmarks']) or 'none'}; "
                  f"{dec['short_items_skipped']} texts too short to count); removed {dec['removed']} "
                  f"(by split: {dec['by_split']})", ""]
        lines += [f"- `{m['id']}` ({m['split']}) hit `{m['item']}` ({m['against']}): \"{m['ngram']}\""
                  for m in dec["matches"][:10]]
        lines.append("")
    lines += _earlier(report.get("history") or {})
    lines += ["### Splits", "", *_table(["split", "records", "sha256"],
                                        [[n, s["count"], s["sha256"][:16]] for n, s in splits.items()])]
    if strata := report.get("strata"):
        lines += ["", "Each group's split is a hash draw, so shares match the ratios up to sampling noise "
                  "(tolerance: 3 standard deviations):", "",
                  *_table(["stratum", "records", "test share (ratio ± tolerance)", "val share (ratio ± tolerance)"],
                          [[k, v["records"], *(f"{v[s]['share']:.3f} ({v[s]['ratio']} ± {v[s]['tolerance']:.3f})"
                                               + ("" if v[s]["within"] else " **outside**") for s in ("test", "val"))]
                           for k, v in strata.items()])]
    return "\n".join(lines) + "\n"


def _earlier(h: dict) -> list[str]:
    if not h.get("versions"):
        return []
    return ["### Seen by earlier versions", "",
            f"against v{', v'.join(map(str, h['versions']))}: {h['new']} new records, {h['seen']} already seen, "
            f"{h['near_seen']} near duplicates of seen records (each keeps the earlier split); {h['bridges']} "
            "rejected for bridging an earlier test item and earlier training data", "",
            *(f"- `{e['record']}`: {e['seen']} of v{e['version']} `{e['id']}` ({e['split']})" for e in h["examples"][:10]),
            ""]
