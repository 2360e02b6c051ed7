"""Near dedup speed: sftflow's vectorised MinHash LSH vs datasketch's MinHashLSH used the plain way.

Corpus: all 12 Super-NaturalInstructions tasks in the shared data folder (~40k records) plus planted
near duplicates (one word changed in a record's own text). Both sides get the same task: texts in,
near-duplicate clusters out, same words, 3-word shingles, shingles in more than 1% of records dropped
as template text, 128 permutations, threshold 0.7. Recall is measured on the planted pairs; each side
runs in its own process (3 repeats, median time; peak RSS above the process's start).

    .venv/bin/python benchmarks/near_dedup.py [--data-root ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

THRESHOLD, NUM_PERM, SHINGLE, PLANTED = 0.7, 128, 3, 1000


def corpus(data_root: Path, out: Path, max_records: int | None = None) -> None:
    from sftflow.configs.schema import DataConfig, Source
    from sftflow.records import read_jsonl
    from sftflow.tasks.data.curate import dedup_text
    from sftflow.tasks.data.load import load

    loaded = load(DataConfig(root=str(data_root), sources=[Source(path="natural-instructions/tasks/*.json")]),
                  out.parent / "load")
    records = list(read_jsonl(Path(loaded["records"])))
    if max_records:  # a seeded sample (--quick runs of `python -m benchmarks`)
        records = random.Random(1).sample(records, min(max_records, len(records)))
    texts = [dedup_text(r) for r in records]
    ids = [r["id"] for r in records]
    rng = random.Random(0)
    # plant copies of records whose own text (after the shared definition) is long enough to judge
    candidates = [i for i, r in enumerate(records) if len(r["messages"][0]["content"].split("\n\n")[-1].split()) >= 40]
    planted = []
    for k, i in enumerate(rng.sample(candidates, min(PLANTED, len(candidates) // 2))):
        ws = texts[i].split(" ")
        j = len(ws) - 1 - rng.randrange(30)  # inside the record's own text, which comes last
        ws[j] = "planted"
        texts.append(" ".join(ws))
        ids.append(f"planted-{k:04d}")
        planted.append([ids[i], ids[-1]])
    out.write_text(json.dumps({"texts": texts, "ids": ids, "planted": planted}))


def run_sftflow(texts: list[str], ids: list[str]) -> list[list[str]]:
    from sftflow.configs.schema import NearDedupConfig
    from sftflow.tasks.data.dedup.minhash import near_duplicates

    cfg = NearDedupConfig(threshold=THRESHOLD, num_perm=NUM_PERM, shingle=SHINGLE)
    near = near_duplicates(texts, ids, cfg)
    return [[ids[i] for i in c] for c in near.clusters]


def run_datasketch(texts: list[str], ids: list[str]) -> list[list[str]]:
    """The plain way: one MinHash per record, one LSH index, query then insert; union the hits."""
    from datasketch import MinHash, MinHashLSH

    from sftflow.tasks.data.dedup.minhash import words

    sets = []
    for t in texts:
        ws = words(t)
        sets.append({" ".join(ws[i:i + SHINGLE]) for i in range(max(len(ws) - SHINGLE + 1, 1 if ws else 0))})
    df = Counter(s for st in sets for s in st)
    limit = max(20, 0.01 * len(texts))
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    parent = {}

    def root(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for key, st in zip(ids, sets):
        st = [s.encode() for s in st if df[s] <= limit]
        if not st:
            continue
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(st)
        for other in lsh.query(m):
            parent[root(key)] = root(other)
        lsh.insert(key, m)
    clusters: dict[str, list[str]] = {}
    for key in set(parent) | set(parent.values()):
        clusters.setdefault(root(key), []).append(key)
    return [sorted(c) for c in clusters.values() if len(c) > 1]


def worker(method: str, corpus_path: str, repeats: int) -> None:
    data = json.loads(Path(corpus_path).read_text())
    fn = {"sftflow": run_sftflow, "datasketch": run_datasketch}[method]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        clusters = fn(data["texts"], data["ids"])
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    where = {i: n for n, c in enumerate(clusters) for i in c}
    found = sum(a in where and where.get(a) == where.get(b) for a, b in data["planted"])
    print(json.dumps({"method": method, "median_s": statistics.median(times), "times": times,
                      "records": len(data["texts"]), "planted": len(data["planted"]), "recall": found / len(data["planted"]),
                      "clusters": len(clusters), "clustered": sum(map(len, clusters)),
                      "peak_rss_mib": peak / 1024, "rss_above_start_mib": (peak - base_rss) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-records", type=int, help="a seeded sample of the corpus (default: all of it)")
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SFTFLOW_HOME", tmp)  # load()'s cache entries go away with the run
        path = Path(tmp) / "corpus.json"
        corpus(Path(args.data_root), path, args.max_records)
        results = {}
        for method in ("sftflow", "datasketch"):
            proc = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--worker", method,
                                   str(path)], check=True, capture_output=True, text=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[method]))
    s, d = results["sftflow"], results["datasketch"]
    print(f"\n{s['records']} records ({s['planted']} planted near duplicates)")
    print(f"sftflow {s['records'] / s['median_s']:.0f} records/s (median {s['median_s']:.2f} s, recall "
          f"{s['recall']:.3f}, peak RSS {s['peak_rss_mib']:.0f} MiB, +{s['rss_above_start_mib']:.0f})")
    print(f"datasketch {d['records'] / d['median_s']:.0f} records/s (median {d['median_s']:.2f} s, recall "
          f"{d['recall']:.3f}, peak RSS {d['peak_rss_mib']:.0f} MiB, +{d['rss_above_start_mib']:.0f})")
    print(f"speed-up {d['median_s'] / s['median_s']:.2f}x at recall {s['recall']:.3f} vs {d['recall']:.3f}")


if __name__ == "__main__":
    main()
