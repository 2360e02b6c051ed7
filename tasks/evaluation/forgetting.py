"""Forgetting: a fine-tuned model vs the base on the same benchmark items.

One row per benchmark, per lm-eval category (mmlu_stem, ...) and per subtask: both scores, the delta
(fine-tuned minus base), its 95% paired-bootstrap CI, a paired test (McNemar on 0/1 scores) and the
minimum detectable effect (MDE) of that test at 80% power given n and the observed discordance.
A drop is flagged when it is significant at `alpha`; subtask p-values are Holm-adjusted within their
benchmark first, since dozens of subtasks are tested at once.
"""

from __future__ import annotations

from sftflow import metrics as names
from sftflow import stats


def _p(row: dict) -> float:
    """The p-value a flag rests on: Holm-adjusted for subtasks, raw for benchmarks and categories."""
    return row["p_value"] if row["p_holm"] is None else row["p_holm"]


def _index(items: list[dict]) -> dict[tuple, dict]:
    return {(it["benchmark"], it["task"], it["doc_id"]): it for it in items}


def forgetting_rows(base_items: list[dict], ft_items: list[dict], iters: int = 2000, alpha: float = 0.05,
                    seed: int = 0) -> list[dict]:
    base, ft = _index(base_items), _index(ft_items)
    if base.keys() != ft.keys():
        missing = sorted(base.keys() ^ ft.keys())[:5]
        raise ValueError(f"base and fine-tuned were scored on different items, e.g. {missing}")
    scopes: dict[tuple[str, str, str], list[tuple]] = {}
    for key, it in base.items():
        bench, task = key[0], key[1]
        scopes.setdefault(("benchmark", bench, bench), []).append(key)
        if it.get("category"):
            scopes.setdefault(("category", bench, it["category"]), []).append(key)
        scopes.setdefault(("subtask", bench, f"{bench}/{task}"), []).append(key)
    rows = []
    for (scope, bench, name), keys in scopes.items():
        result = stats.compare([base[k]["score"] for k in keys], [ft[k]["score"] for k in keys], iters,
                               1 - alpha, seed)
        rows.append({"scope": scope, "benchmark": bench, "name": name, "metric": base[keys[0]]["metric"],
                     "base_only": None, "ft_only": None, "p_holm": None, **result})
    for bench in {r["benchmark"] for r in rows}:
        subs = [r for r in rows if r["scope"] == "subtask" and r["benchmark"] == bench]
        for r, p in zip(subs, stats.holm([r["p_value"] for r in subs])):
            r["p_holm"] = p
    for r in rows:
        r["significant_drop"] = r["delta"] < 0 and _p(r) < alpha
    order = {"benchmark": 0, "category": 1, "subtask": 2}
    return sorted(rows, key=lambda r: (r["benchmark"], order[r["scope"]], r["name"]))


def forgetting_metrics(rows: list[dict], tag: str) -> dict[str, float]:
    """Benchmarks and categories get the full set; subtasks only their delta (the rest is in the JSON)."""
    out: dict[str, float] = {}
    for r in rows:
        if r["scope"] == "subtask":
            out[names.forgetting(r["name"], "delta", tag)] = r["delta"]
            continue
        for field in ("delta", *names.DELTA_STATS):
            out[names.forgetting(r["name"], field, tag)] = r[field]
        out[names.forgetting(r["name"], "significant_drop", tag)] = float(r["significant_drop"])
    return out


def to_markdown(rows: list[dict], tag: str, alpha: float) -> str:
    lines = [f"## Forgetting: {tag} minus base", "",
             f"Delta with a 95% paired-bootstrap CI; p from McNemar's exact test (subtasks: Holm-adjusted "
             f"within the benchmark). **drop**: significant at {alpha}. MDE: the smallest difference the test "
             f"finds with 80% power given n and the share of items the models answer differently.", "",
             "| scope | name | metric | n | base | " + tag + " | delta | 95% CI | p | MDE | |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        p = _p(r)
        lines.append(f"| {r['scope']} | {r['name']} | {r['metric']} | {r['n']} | {r['base']:.3f} | {r['ft']:.3f} "
                     f"| {r['delta']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {p:.3g} | {r['mde']:.3f} "
                     f"| {'**drop**' if r['significant_drop'] else ''} |")
    return "\n".join(lines)
