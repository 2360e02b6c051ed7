"""Stage 3: seeded, reproducible train/val/test split (stratified by label), with id manifests."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from sftflow.configs.schema import SplitConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tracking import stage_task

SPLITS = ("train", "val", "test")


def assign(records: list[dict], cfg: SplitConfig) -> dict[str, list[dict]]:
    """Shuffle each stratum with the seed and cut it by the ratios; output keeps input order."""
    strata: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        strata[f"{r['source']}|{r.get('label')}" if cfg.stratify else ""].append(i)
    which: dict[int, str] = {}
    for key in sorted(strata):
        idx = strata[key]
        random.Random(f"{cfg.seed}:{key}").shuffle(idx)
        n_test, n_val = round(len(idx) * cfg.test_ratio), round(len(idx) * cfg.val_ratio)
        for j, i in enumerate(idx):
            which[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        out[which[i]].append(r)
    return out


def manifest(rows: list[dict]) -> dict:
    blob = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows).encode()
    return {"count": len(rows), "sha256": hashlib.sha256(blob).hexdigest(), "ids": [r["id"] for r in rows]}


def split(records_path: str, cfg: SplitConfig, out_dir: Path) -> dict:
    records = list(read_jsonl(Path(records_path)))
    parts = assign(records, cfg)
    if not parts["train"]:
        raise ValueError(f"the train split is empty ({len(records)} records after curation): add data")
    paths, manifests = {}, {}
    for name in SPLITS:
        paths[name] = str(out_dir / f"{name}.jsonl")
        write_jsonl(out_dir / f"{name}.jsonl", parts[name])
        manifests[name] = manifest(parts[name])
    (out_dir / "manifest.json").write_text(json.dumps(manifests, indent=2))
    metrics = {f"split/{n}": len(parts[n]) for n in SPLITS}
    return {"paths": paths, "metrics": metrics, "artifacts": [out_dir / "manifest.json"],
            "digests": {n: m["sha256"] for n, m in manifests.items()}}


split_task = stage_task(split, "split")
