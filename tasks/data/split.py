"""Stage 3: leak-proof train/val/test split and decontamination; the data stage's ledger and report close it.

Records are split in groups: a near-duplicate cluster (from curate) and equal `group_key` values stay
in one split; groups are shuffled with the seed within strata (source + label or category) and cut by
the ratios, so the same input and seed give the same bytes. Then, in this order: records of any split
that overlap an evaluated benchmark item, and train records that overlap the test split, are removed
(the test split must exist before it can be checked against). records in = kept + rejected + exact
dups + near dups + contaminated is asserted over the whole data stage (ledger.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections import defaultdict
from pathlib import Path

from sftflow import cache
from sftflow.cache import cached
from sftflow.configs.schema import SplitConfig
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.results import Splits
from sftflow.tasks.data import decontam
from sftflow.tasks.data.ledger import account, dominant_lines, markdown
from sftflow.tasks.data.load import DataError
from sftflow.tracking import stage, unique_race_retry

SPLITS = ("train", "val", "test")


def _field(record: dict, key: str):
    return record["meta"].get(key.removeprefix("meta.")) if key.startswith("meta.") else record.get(key)


def group_keys(record: dict, cfg: SplitConfig) -> list[str]:
    """Keys that tie records to one split: its near-duplicate cluster and its `group_key` value."""
    keys = [f"cluster:{record['meta']['near_dup_cluster']}"] if record["meta"].get("near_dup_cluster") else []
    if cfg.group_key and _field(record, cfg.group_key) is not None:
        keys.append(f"group:{_field(record, cfg.group_key)}")
    return keys


def groups(records: list[dict], cfg: SplitConfig) -> dict[str, list[int]]:
    """Connected groups of record indices (union-find over shared keys), named by their lowest id."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        for k in group_keys(r, cfg):
            j = first.setdefault(k, i)
            parent[root(i)] = root(j)
    out: dict[int, list[int]] = {}
    for i in range(len(records)):
        out.setdefault(root(i), []).append(i)
    return {min(records[i]["id"] for i in members): members for members in out.values()}


def stratum_of(record: dict, cfg: SplitConfig) -> str:
    if not cfg.stratify:
        return ""
    return f"{record['source']}|{record.get('label') or record['meta'].get('category')}"


def assign(records: list[dict], cfg: SplitConfig) -> dict[str, list[dict]]:
    """Shuffle each stratum's groups with the seed, fill test then val up to their ratios; output keeps input order."""
    grouped = groups(records, cfg)
    strata: dict[str, list[str]] = defaultdict(list)
    for g, members in grouped.items():  # a group's stratum is that of its first member
        strata[stratum_of(records[members[0]], cfg)].append(g)
    which: dict[int, str] = {}
    for key in sorted(strata):
        gs = sorted(strata[key])
        random.Random(f"{cfg.seed}:{key}").shuffle(gs)
        size = sum(len(grouped[g]) for g in gs)
        want = {"test": round(size * cfg.test_ratio), "val": round(size * cfg.val_ratio)}
        got = {"test": 0, "val": 0}
        for g in gs:
            name = next((s for s in ("test", "val") if got[s] < want[s]), "train")
            if name != "train":
                got[name] += len(grouped[g])
            which.update({i: name for i in grouped[g]})
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        out[which[i]].append(r)
    return out


def manifest(rows: list[dict]) -> dict:
    blob = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows).encode()
    return {"count": len(rows), "sha256": hashlib.sha256(blob).hexdigest(), "ids": [r["id"] for r in rows]}


def decontaminate(parts: dict[str, list[dict]], cfg: SplitConfig, bench_targets: dict, benchmark_root: Path | None):
    """Remove records overlapping benchmark items (any split) and train records overlapping the test split."""
    hits: dict[str, dict] = {}
    report = {"benchmarks": sorted(bench_targets), "benchmark_items": 0, "short_items_skipped": 0}
    if cfg.decontam.enabled and bench_targets:
        if benchmark_root is None:
            raise ValueError("decontamination against benchmarks needs their folder (eval.benchmark_root)")
        index = decontam.benchmark_index(bench_targets, benchmark_root, cfg.decontam)
        report.update(benchmark_items=len({*index.ref.values()}), short_items_skipped=index.skipped)
        everything = [r for s in SPLITS for r in parts[s]]
        hits.update({k: {**v, "against": "benchmark"} for k, v in decontam.contaminated(everything, index).items()})
    if cfg.decontam.enabled and parts["test"]:
        index = decontam.NgramIndex([(r["id"], decontam.record_texts(r)) for r in parts["test"]], cfg.decontam,
                                    corpus=[decontam.record_texts(r) for r in parts["train"]])
        train = [r for r in parts["train"] if r["id"] not in hits]
        hits.update({k: {**v, "against": "test_split"} for k, v in decontam.contaminated(train, index).items()})
    rejects = [reject({**r, "meta": {**r["meta"], "contaminated_by": hits[r["id"]]}}, "split",
                      f"contaminated:{hits[r['id']]['against']}") for s in SPLITS for r in parts[s] if r["id"] in hits]
    clean = {s: [r for r in parts[s] if r["id"] not in hits] for s in SPLITS}
    split_of = {r["id"]: s for s in SPLITS for r in parts[s]}
    report.update(removed=len(hits), by_split={s: sum(split_of[k] == s for k in hits) for s in SPLITS},
                  matches=[{"id": k, "split": split_of[k], **v} for k, v in sorted(hits.items())][:200])
    return clean, rejects, report


def log_datasets(paths: dict[str, Path]) -> None:
    """Each split as an MLflow dataset input (name, digest, source) of the active run."""
    import mlflow
    import pandas as pd

    if mlflow.active_run() is None:
        return
    for name, path in paths.items():
        rows = [{"id": r["id"], "source": r["source"], "label": r.get("label"),
                 "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in read_jsonl(path)]
        df = pd.DataFrame(rows, columns=["id", "source", "label", "messages"])
        with warnings.catch_warnings():  # a local path fits two equivalent local source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=str(path), name=name)
        unique_race_retry(lambda: mlflow.log_input(dataset, context=name))


def _split(records_path: str, cfg: SplitConfig, out_dir: Path, upstream: dict, bench_targets: dict,
           benchmark_root: Path | None) -> dict:
    records = list(read_jsonl(Path(records_path)))
    parts, rejects, contam = decontaminate(assign(records, cfg), cfg, bench_targets, benchmark_root)
    dominant = dominant_lines(upstream, rejects)
    if not parts["train"]:
        raise DataError(f"the train split is empty ({len(records)} records after curation): add data"
                        + "".join(f"; {line}" for line in dominant))
    paths, manifests = {}, {}
    for name in SPLITS:
        paths[name] = str(out_dir / f"{name}.jsonl")
        write_jsonl(out_dir / f"{name}.jsonl", parts[name])
        manifests[name] = manifest(parts[name])
    write_jsonl(out_dir / "decontam_rejects.jsonl", rejects)
    (out_dir / "manifest.json").write_text(json.dumps(manifests, indent=2))
    ledger = account(upstream, len(records), parts, len(rejects))
    report = {"accounting": ledger, **upstream, "decontamination": contam, "dominant": dominant,
              "splits": {n: {"count": m["count"], "sha256": m["sha256"]} for n, m in manifests.items()}}
    (out_dir / "curation_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out_dir / "curation_report.md").write_text(markdown(report))
    metrics = {**{f"split/{n}": len(parts[n]) for n in SPLITS}, "split/contaminated": len(rejects),
               **{f"data/{k}": v for k, v in ledger.items()}}
    return {"paths": paths, "metrics": metrics, "report_md": markdown(report),
            "digests": {n: m["sha256"] for n, m in manifests.items()},
            "artifacts": [out_dir / n for n in ("manifest.json", "curation_report.json", "curation_report.md",
                                                "decontam_rejects.jsonl")]}


@stage("split")
def split(records_path: str, cfg: SplitConfig, out_dir: Path, upstream: dict | None = None,
          benchmarks: dict | None = None, benchmark_root: str | None = None) -> Splits:
    """Split curate's records; `upstream` = {"load": ..., "curate": ...} counts for the ledger and report;
    `benchmarks` = {name: subtasks} to decontaminate against (see decontam.targets), read under
    `benchmark_root` (eval.benchmark_root)."""
    upstream, benchmarks = upstream or {}, benchmarks or {}
    root = Path(benchmark_root) if benchmark_root else None
    files = decontam.benchmark_files(benchmarks, root) if root and cfg.decontam.enabled else []
    key = cache.key("split-v2", Path(records_path), cfg, upstream, benchmarks,
                    [(str(f.relative_to(root)), f) for f in files])
    result = cached("split", key, out_dir, lambda d: _split(records_path, cfg, d, upstream, benchmarks, root))
    log_datasets({n: Path(p) for n, p in result["paths"].items()})
    return result
