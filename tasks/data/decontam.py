"""Decontamination: word n-gram overlap of training records with benchmark items and the test split.

N-grams shared by more than `boilerplate_df` texts (task instructions, prompt stems), and whole texts shorter
than an n-gram shared as often (a short system prompt in every record), are template text, not a leak: they are
cut out of each item first. What is left of an item counts by its n-grams of
`ngram` words; a remainder shorter than that must appear whole, and one shorter than `min_words` is
too generic to be evidence and is skipped (counted). Items come from the same originals the eval
stage reads, under eval.benchmark_root (never data.root, which holds training data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sftflow.configs.schema import DecontamConfig, EvalConfig
from sftflow.errors import UserError
from sftflow.tasks.data.dedup.minhash import words
from sftflow.tasks.evaluation.catalog import BENCHMARKS, check


def targets(eval_cfg: EvalConfig) -> dict[str, list[str] | str]:
    """The benchmarks (and subtasks) this run evaluates on."""
    return {name: getattr(eval_cfg, name).subtasks for name in BENCHMARKS if getattr(eval_cfg, name).enabled}


class DecontamError(UserError):
    """Decontamination is on against benchmarks but found nothing to check against."""


def benchmark_items(bench_targets: dict, benchmark_root: Path) -> list[tuple[str, list[str]]]:
    """(ref, texts) per item of every evaluated split (test and the few-shot sources)."""
    check(benchmark_root, bench_targets)
    return [(f"{name}/{sub}/{split}/{i}", texts)
            for name, subs in bench_targets.items() for sub in BENCHMARKS[name].subtasks(subs)
            for split in BENCHMARKS[name].splits
            for i, texts in enumerate(BENCHMARKS[name].items(benchmark_root, sub, split))]


def benchmark_index(bench_targets: dict, benchmark_root: Path, cfg: DecontamConfig) -> "NgramIndex":
    """The n-gram index of the evaluated benchmarks; an index of nothing is an error, not a clean result."""
    index = NgramIndex(benchmark_items(bench_targets, benchmark_root), cfg)
    if not index.ref:
        raise DecontamError(f"decontamination against {', '.join(sorted(bench_targets))} indexed 0 benchmark "
                            f"items from eval.benchmark_root = {benchmark_root}: it would remove nothing. Point "
                            "eval.benchmark_root at the MMLU/BBH originals, or set split.decontam.enabled=false.")
    return index


def benchmark_files(bench_targets: dict, benchmark_root: Path) -> list[Path]:
    """The benchmark files decontamination reads (for cache keys)."""
    check(benchmark_root, bench_targets)
    return sorted({f for name, subs in bench_targets.items() for sub in BENCHMARKS[name].subtasks(subs)
                   for f in BENCHMARKS[name].files(benchmark_root, sub)})


def _grams(ws: list[str], n: int) -> Iterable[str]:
    return (" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1))


def record_texts(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"]]


def _segments(ws: list[str], n: int, boilerplate: set[str]) -> list[list[str]]:
    """Maximal runs of words not covered by a boilerplate n-gram."""
    covered = [False] * len(ws)
    for i in range(len(ws) - n + 1):
        if " ".join(ws[i:i + n]) in boilerplate:
            covered[i:i + n] = [True] * n
    runs, run = [], []
    for w, c in zip(ws, covered):
        if c:
            runs, run = (runs + [run] if run else runs), []
        else:
            run.append(w)
    return runs + [run] if run else runs


class NgramIndex:
    """N-grams of reference items (template text cut out first) -> the first item holding each.

    Boilerplate: `ngram`-grams found in more than `boilerplate_df` texts among the items and `corpus`
    (the records to be checked). Each item's words outside boilerplate form segments; a segment of at
    least `ngram` words counts by its n-grams, a shorter one (of at least `min_words`) must appear whole."""

    def __init__(self, items: list[tuple[str, list[str]]], cfg: DecontamConfig, corpus: Iterable[list[str]] = ()):
        n = cfg.ngram
        item_words = [(ref, [words(t) for t in texts]) for ref, texts in items]
        df: Counter[str] = Counter()
        for texts in [t for _, t in item_words] + [[words(t) for t in c] for c in corpus]:
            # A text shorter than an n-gram has none: it counts whole, so a shared short prompt is template too.
            df.update({g for ws in texts for g in _grams(ws, n)} | {" ".join(ws) for ws in texts if len(ws) < n})
        boilerplate = {g for g, c in df.items() if c > cfg.boilerplate_df}
        self.ref: dict[str, str] = {}
        self.skipped = 0
        for ref, texts in item_words:
            for ws in texts:
                segments = [seg for seg in _segments(ws, n, boilerplate)
                            if len(seg) >= cfg.min_words and " ".join(seg) not in boilerplate]
                self.skipped += not segments
                for seg in segments:
                    for g in _grams(seg, min(n, len(seg))):
                        self.ref.setdefault(g, ref)
        self.sizes = sorted({g.count(" ") + 1 for g in self.ref})

    def hit(self, texts: list[str]) -> str | None:
        """The first indexed n-gram found in `texts`, or None."""
        for text in texts:
            ws = words(text)
            for n in self.sizes:
                g = next((g for g in _grams(ws, n) if g in self.ref), None)
                if g is not None:
                    return g
        return None


def contaminated(records: list[dict], index: NgramIndex) -> dict[str, dict]:
    """{record id: {"item": ref, "ngram": text}} for records holding an item's n-gram."""
    out = {}
    for r in records:
        g = index.hit(record_texts(r))
        if g is not None:
            out[r["id"]] = {"item": index.ref[g], "ngram": g}
    return out
