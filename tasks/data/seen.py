"""Records that earlier versions of a model name already saw, and the split each must keep.

A record whose content key (exact dedup's normalised turns) is in the history keeps the split it had. A
record that is a near duplicate (MinHash, the history's own settings) of earlier records takes their split;
one that is a near duplicate of an earlier test item *and* of an earlier train or val item bridges the two
and is rejected (`bridge`): it could neither train (it is a test item) nor be tested (the champion trained on
its twin). So no earlier test item, exact or near, ever trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftflow import history
from sftflow.configs.schema import NearDedupConfig
from sftflow.tasks.data.dedup.exact import content_key
from sftflow.tasks.data.dedup.minhash import corpus_signatures, matches

BRIDGE = "bridge"
ORDER = ("test", "val", "train")  # which earlier split an exact key keeps when versions disagree


def dedup_text(record: dict) -> str:
    """What near dedup compares: the conversation without its system prompt (as curate)."""
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")


@dataclass
class Seen:
    keys: list[str]  # content key per record
    signatures: np.ndarray  # MinHash rows per record, with the run's own near-dedup settings
    pins: dict[str, str]  # record id -> split it must keep (or BRIDGE)
    why: dict[str, dict]  # record id -> {"seen": "exact" | "near", "version", "id" (the earlier record)}

    def counts(self, n: int) -> dict:
        exact = sum(w["seen"] == "exact" for w in self.why.values())
        near = sum(w["seen"] == "near" for w in self.why.values())
        return {"new": n - exact - near, "seen": exact, "near_seen": near,
                "bridges": sum(p == BRIDGE for p in self.pins.values())}


def _signatures(texts: list[str], settings: dict) -> tuple[np.ndarray, np.ndarray]:
    return corpus_signatures(texts, NearDedupConfig.model_validate(settings))


def seen(records: list[dict], near: NearDedupConfig, versions: list[history.Version]) -> Seen:
    """Keys, signatures and pins of `records` against `versions` (history.versions(name, with_index=True))."""
    texts = [dedup_text(r) for r in records]
    keys = [content_key(r) for r in records]
    own = near.model_dump(mode="json")
    sig, present = _signatures(texts, own)
    exact: dict[str, tuple[str, int, str]] = {}  # key -> (split, version, id)
    for v in versions:
        for row in v.index:
            old = exact.get(row["key"])
            if old is None or ORDER.index(row["split"]) < ORDER.index(old[0]):
                exact[row["key"]] = (row["split"], v.version, row["id"])
    pins, why = {}, {}
    for r, k in zip(records, keys):
        if k in exact:
            pins[r["id"]], version, old_id = exact[k]
            why[r["id"]] = {"seen": "exact", "version": version, "id": old_id, "split": pins[r["id"]]}
    near_splits: dict[int, dict[str, tuple[int, str]]] = {}  # record row -> {split: (version, id)}
    by_settings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for v in versions:
        settings = v.meta.get("minhash") or own
        label = str(sorted(settings.items()))
        if label not in by_settings:
            by_settings[label] = (sig, present) if settings == own else _signatures(texts, settings)
        mine, mine_present = by_settings[label]
        old = history.signatures(v)
        cfg = NearDedupConfig.model_validate(settings)
        for i, j in matches(mine, mine_present, old, (old != np.iinfo(np.uint32).max).any(axis=1), cfg):
            near_splits.setdefault(int(i), {}).setdefault(v.index[j]["split"], (v.version, v.index[j]["id"]))
    for i, found in near_splits.items():
        rid = records[i]["id"]
        if rid in pins:
            continue
        split = BRIDGE if "test" in found and len(found) > 1 else next(s for s in ORDER if s in found)
        version, old_id = found.get("test") or next(found[s] for s in ORDER if s in found)
        pins[rid] = split
        why[rid] = {"seen": "near", "version": version, "id": old_id, "split": split,
                    **({"splits": sorted(found)} if split == BRIDGE else {})}
    return Seen(keys=keys, signatures=sig, pins=pins, why=why)
