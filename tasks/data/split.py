"""Stage 3: stable, leak-proof train/val/test split and decontamination; the data stage's ledger and report close it.

Records are split in groups: a near-duplicate cluster (from curate) and equal `group_key` values stay in
one split. A group's split is a pure function of the seed and the group (a hash of its `group_key` value,
else of its members' lowest content key, compared with the ratios), never of how many other records
there are: adding or removing records moves no other group. Shares therefore match the ratios up to
sampling noise (binomial; the report lists each stratum's). When earlier versions of the model name
trained (sftflow/history.py), what they saw keeps its split (seen.py): a group holding earlier records
takes their split, and new records that would join an earlier test item with earlier training data are
rejected as bridges. Then, in this order: records of any split that overlap an evaluated benchmark item,
and train records that overlap the test split or an earlier version's test items, are removed.
records in = kept + rejected + exact dups + near dups + contaminated + bridged is asserted over the whole
data stage (ledger.py).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from sftflow import cache, history
from sftflow import metrics as names
from sftflow.cache import cached
from sftflow.configs.schema import NearDedupConfig, SplitConfig
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.results import Splits
from sftflow.tasks.data import decontam, seen
from sftflow.tasks.data.dedup import exact
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


def anchor(members: list[dict], keys: list[str], cfg: SplitConfig) -> str:
    """What names a group whatever else the data holds: its `group_key` value, else its lowest content key."""
    values = sorted(str(_field(r, cfg.group_key)) for r in members
                    if cfg.group_key and _field(r, cfg.group_key) is not None)
    return f"group:{values[0]}" if values else f"content:{min(keys)}"


def draw(name: str, cfg: SplitConfig) -> str:
    """The split of a group named `name`: a uniform draw in [0, 1) from its hash, cut by the ratios."""
    u = int(hashlib.sha256(f"{cfg.seed}:{name}".encode()).hexdigest()[:15], 16) / 16**15
    return "test" if u < cfg.test_ratio else "val" if u < cfg.test_ratio + cfg.val_ratio else "train"


def assign(records: list[dict], cfg: SplitConfig, found: seen.Seen | None = None) -> dict[str, list[dict]]:
    """Each group's split: its members' pinned split when they have one (earlier versions saw them, seen.py),
    else its hash draw. In a group whose pins disagree, records seen exactly keep theirs and the rest go to
    `bridged` (rejected), as do records pinned as bridges. Output keeps input order."""
    pins, why = (found.pins, found.why) if found else ({}, {})
    keys = found.keys if found else [exact.content_key(r) for r in records]
    which: dict[int, str] = {}
    for members in groups(records, cfg).values():
        pinned = {pins[records[i]["id"]] for i in members if records[i]["id"] in pins}
        if len(pinned) > 1 or seen.BRIDGE in pinned:
            which.update({i: pins[rid] if why.get(rid := records[i]["id"], {}).get("seen") == "exact" else seen.BRIDGE
                          for i in members})
        elif pinned:
            (only,) = pinned
            which.update({i: only for i in members})
        else:
            name = draw(anchor([records[i] for i in members], [keys[i] for i in members], cfg), cfg)
            which.update({i: name for i in members})
    out: dict[str, list[dict]] = {s: [] for s in (*SPLITS, "bridged")}
    for i, r in enumerate(records):
        out["bridged" if which[i] == seen.BRIDGE else which[i]].append(r)
    return out


def shares(parts: dict[str, list[dict]], cfg: SplitConfig) -> dict[str, dict]:
    """Per stratum: records and each split's share, with the tolerance sampling noise allows (3 sd)."""
    table: dict[str, dict] = defaultdict(lambda: {s: 0 for s in SPLITS})
    for name in SPLITS:
        for r in parts[name]:
            table[stratum_of(r, cfg) or "all"][name] += 1
    out = {}
    for stratum, counts in sorted(table.items()):
        n = sum(counts.values())
        row = {"records": n}
        for name, ratio in (("test", cfg.test_ratio), ("val", cfg.val_ratio)):
            tolerance = 3 * (ratio * (1 - ratio) / n) ** 0.5
            row[name] = {"share": round(counts[name] / n, 4), "ratio": ratio, "tolerance": round(tolerance, 4),
                         "within": abs(counts[name] / n - ratio) <= tolerance}
        out[stratum] = row
    return out


def manifest(rows: list[dict]) -> dict:
    blob = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows).encode()
    return {"count": len(rows), "sha256": hashlib.sha256(blob).hexdigest(), "ids": [r["id"] for r in rows]}


def decontaminate(parts: dict[str, list[dict]], cfg: SplitConfig, bench_targets: dict, benchmark_root: Path | None,
                  earlier_test: list[dict] = ()):
    """Remove records overlapping benchmark items (any split) and train records overlapping the test split or
    `earlier_test` (earlier versions' test items that are no longer in the data)."""
    hits: dict[str, dict] = {}
    report = {"benchmarks": sorted(bench_targets), "benchmark_items": 0, "short_items_skipped": 0}
    if cfg.decontam.enabled and bench_targets:
        if benchmark_root is None:
            raise ValueError("decontamination against benchmarks needs their folder (eval.benchmark_root)")
        index = decontam.benchmark_index(bench_targets, benchmark_root, cfg.decontam)
        report.update(benchmark_items=len({*index.ref.values()}), short_items_skipped=index.skipped)
        everything = [r for s in SPLITS for r in parts[s]]
        hits.update({k: {**v, "against": "benchmark"} for k, v in decontam.contaminated(everything, index).items()})
    tests = [*parts["test"], *earlier_test]
    if cfg.decontam.enabled and tests:
        index = decontam.NgramIndex([(r["id"], decontam.record_texts(r)) for r in tests], cfg.decontam,
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


def earlier_test_items(versions: list, present: set[str]) -> list[dict]:
    """Earlier versions' test items whose content is not among `present` keys, once each."""
    out, keys = [], set(present)
    for v in versions:
        for r in read_jsonl(v.path / "test.jsonl"):
            if (k := exact.content_key(r)) not in keys:
                keys.add(k)
                out.append({**r, "id": f"v{v.version}:{r['id']}"})
    return out


def write_index(out_dir: Path, parts: dict[str, list[dict]], found: seen.Seen, records: list[dict],
                near: NearDedupConfig) -> None:
    """What the history keeps of this run's splits: content keys, splits and MinHash rows, in one order."""
    row = {r["id"]: i for i, r in enumerate(records)}
    kept = [(name, r) for name in SPLITS for r in parts[name]]
    write_jsonl(out_dir / "index.jsonl", [{"key": found.keys[row[r["id"]]], "split": name, "id": r["id"],
                                           "source": r["source"], "seen": found.why.get(r["id"], {}).get("seen", "new")}
                                          for name, r in kept])
    np.save(out_dir / "signatures.npy", found.signatures[[row[r["id"]] for _, r in kept]])
    (out_dir / "minhash.json").write_text(json.dumps(near.model_dump(mode="json"), sort_keys=True))


def _split(records_path: str, cfg: SplitConfig, out_dir: Path, upstream: dict, bench_targets: dict,
           benchmark_root: Path | None, near: NearDedupConfig, name: str | None) -> dict:
    records = list(read_jsonl(Path(records_path)))
    versions = history.versions(name, with_index=True) if name else []
    found = seen.seen(records, near, versions)
    drawn = assign(records, cfg, found)
    bridged = [reject({**r, "meta": {**r["meta"], "seen": found.why.get(r["id"])}}, "split", "bridges_earlier_splits")
               for r in drawn.pop("bridged")]
    parts, rejects, contam = decontaminate(drawn, cfg, bench_targets, benchmark_root,
                                           earlier_test_items(versions, set(found.keys)))
    dominant = dominant_lines(upstream, rejects)
    if not parts["train"]:
        raise DataError(f"the train split is empty ({len(records)} records after curation): add data"
                        + "".join(f"; {line}" for line in dominant))
    paths, manifests = {}, {}
    for split_name in SPLITS:
        paths[split_name] = str(out_dir / f"{split_name}.jsonl")
        write_jsonl(out_dir / f"{split_name}.jsonl", parts[split_name])
        manifests[split_name] = manifest(parts[split_name])
    write_jsonl(out_dir / "decontam_rejects.jsonl", [*rejects, *bridged])
    write_index(out_dir, parts, found, records, near)
    (out_dir / "manifest.json").write_text(json.dumps(manifests, indent=2))
    ledger = account(upstream, len(records), parts, len(rejects), len(bridged))
    earlier = {**found.counts(len(records)), "versions": [v.version for v in versions],
               "examples": [{"record": k, **v} for k, v in sorted(found.why.items())][:50]}
    report = {"accounting": ledger, **upstream, "decontamination": contam, "dominant": dominant,
              "history": earlier, "strata": shares(parts, cfg),
              "splits": {n: {"count": m["count"], "sha256": m["sha256"]} for n, m in manifests.items()}}
    (out_dir / "curation_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out_dir / "curation_report.md").write_text(markdown(report))
    metrics = {**{f"split/{n}": len(parts[n]) for n in SPLITS}, "split/contaminated": len(rejects),
               **{f"data/{k}": v for k, v in ledger.items()},
               **({names.split_count(k): earlier[k] for k in names.SPLIT_HISTORY} if versions else {})}
    return {"paths": paths, "metrics": metrics, "report_md": markdown(report),
            "digests": {n: m["sha256"] for n, m in manifests.items()},
            "artifacts": [out_dir / n for n in ("manifest.json", "curation_report.json", "curation_report.md",
                                                "decontam_rejects.jsonl", "index.jsonl")]}


@stage("split")
def split(records_path: str, cfg: SplitConfig, out_dir: Path, upstream: dict | None = None,
          benchmarks: dict | None = None, benchmark_root: str | None = None,
          near: NearDedupConfig | None = None, model_name: str | None = None) -> Splits:
    """Split curate's records; `upstream` = {"load": ..., "curate": ...} counts for the ledger and report;
    `benchmarks` = {name: subtasks} to decontaminate against (see decontam.targets), read under
    `benchmark_root` (eval.benchmark_root); `near`: curate's near-dedup settings, for the signatures the
    history keeps; `model_name`: the model name whose earlier versions' records keep their splits."""
    near = near or NearDedupConfig()
    upstream, benchmarks = upstream or {}, benchmarks or {}
    root = Path(benchmark_root) if benchmark_root else None
    files = decontam.benchmark_files(benchmarks, root) if root and cfg.decontam.enabled else []
    key = cache.key("split-v3", Path(records_path), cfg, upstream, benchmarks,
                    [(str(f.relative_to(root)), f) for f in files], near,
                    history.files(model_name) if model_name else [])
    result = cached("split", key, out_dir, lambda d: _split(records_path, cfg, d, upstream, benchmarks, root,
                                                            near, model_name))
    log_datasets({n: Path(p) for n, p in result["paths"].items()})
    return result
