"""One line per finished stage, built from the metrics it returned: what a person checks first (records kept and
rejected, loss, scores). The Prefect task log carries it (and so the Prefect UI); `sftflow run` prints it."""

from __future__ import annotations

from sftflow import metrics as names

# (format, metric keys): shown when every key is present. Keys are the stages' own metric names.
FIELDS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "load": [("{:.0f} records", ("load/records",)), ("{:.0f} rejected", ("load/rejected",))],
    "curate": [("{:.0f} in", ("curate/records_in",)), ("{:.0f} kept", ("curate/kept",)),
               ("{:.0f} rejected", ("curate/rejected",)),
               ("{:.0f} exact + {:.0f} near duplicates", ("curate/exact_dup", "curate/near_dup"))],
    "split": [("train {:.0f} / val {:.0f} / test {:.0f}", ("split/train", "split/val", "split/test")),
              ("{:.0f} contaminated", ("split/contaminated",)),
              ("earlier versions: {:.0f} new, {:.0f} seen, {:.0f} near duplicates of seen, {:.0f} bridges rejected",
               ("split/new", "split/seen", "split/near_seen", "split/bridges"))],
    "template": [("train {:.0f} records, {:.0f} tokens", ("template/train/records", "template/train/tokens")),
                 ("{:.1%} trained", ("template/train/trained_share",)), ("{:.0f} rejected", ("template/rejected",))],
    "train": [("{:.0f} steps", ("train/steps",)), ("final loss {:.4g}", ("train/final_loss",)),
              ("val loss {:.4g}", ("train/val_loss",)), ("{:.0f} tok/s", ("train/tokens_per_s",))],
}
HELDOUT_MEASURE = "label_acc"
PRECISION_OF = {"train": "train", "heldout": "eval", "benchmarks": "eval"}  # stage -> its params' prefix


def _fields(stage: str, metrics: dict) -> list[str]:
    return [fmt.format(*(metrics[k] for k in keys)) for fmt, keys in FIELDS.get(stage, [])
            if all(k in metrics for k in keys)]


def _heldout(metrics: dict) -> list[str]:
    scores = {tag: v for name, v in metrics.items() if (p := names.parse_heldout(name)) and p[1] == HELDOUT_MEASURE
              for tag in [p[0]]}
    out = [" ".join(f"{tag} {v:.3f}" for tag, v in scores.items())] if scores else []
    if (delta := metrics.get(names.heldout_delta(HELDOUT_MEASURE))) is not None:
        out.append(f"delta {delta:+.3f}")
    if (delta := metrics.get(names.champion_delta(HELDOUT_MEASURE))) is not None:
        out.append(f"vs champion {delta:+.3f}")
    return [f"{HELDOUT_MEASURE}: " + ", ".join(out)] if out else []


def _benchmarks(metrics: dict) -> list[str]:
    """Each benchmark's score per model (not categories or subtasks), then the lm-eval work per model."""
    parsed = {name: e for name in metrics if (e := names.parse_eval(name))}
    benches = {e.scope for e in parsed.values() if e.count}  # only benchmarks carry an item count
    scores: dict[str, list[str]] = {}
    for name, e in sorted(parsed.items()):
        if e.scope in benches and not e.count:
            scores.setdefault(f"{e.scope} {e.metric}", []).append(f"{e.tag} {metrics[name]:.3f}")
    out = [f"{label}: {' '.join(vals)}" for label, vals in scores.items()]
    for name, value in metrics.items():
        if (w := names.parse_eval_work(name)) and w[1] == "wall_s":
            cached = metrics.get(names.eval_work(w[0], "cached_tasks"), 0)
            total = cached + metrics.get(names.eval_work(w[0], "evaluated_tasks"), 0)
            out.append(f"{w[0]} {value:.0f} s ({cached:.0f}/{total:.0f} tasks cached)")
    return out


def _precision(stage: str, params: dict) -> list[str]:
    """Which precision ran and why, e.g. `bf16 (auto: the CPU has AVX512-BF16)`."""
    prefix = PRECISION_OF.get(stage)
    if prefix is None or f"{prefix}.precision_resolved" not in params:
        return []
    return [f"{params[f'{prefix}.precision_resolved']} ({params.get(f'{prefix}.precision_reason', '?')})"]


def stage_summary(stage: str, metrics: dict, params: dict | None = None) -> str:
    """`<stage>: <key figures>` (just the stage name when it reported none of them); params: the stage's own
    (which precision and attention it ran)."""
    params = params or {}
    parts = _fields(stage, metrics)
    if stage == "heldout":
        parts += _heldout(metrics)
    elif stage == "benchmarks":
        parts += _benchmarks(metrics)
    elif stage == "gate" and names.GATE_PASSED in metrics:
        parts.append("passed" if metrics[names.GATE_PASSED] else "failed")
    parts += _precision(stage, params)
    if stage == "template" and params.get("template.mask_source"):  # where the assistant-only mask came from
        parts.append(f"mask {params['template.mask_source']}")
    if stage == "train" and params.get("train.attention"):  # which attention path, windows, softcap
        parts.append(f"attention {params['train.attention']}")
    return ", ".join(parts)


def cache_hit(stage: str, metrics: dict) -> bool:
    return bool(metrics.get(f"{stage}/cache_hit"))
