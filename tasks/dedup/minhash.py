"""Near dedup: MinHash signatures over word shingles, banded LSH buckets, verified pairs, components.

Vectorised over the whole corpus with numpy (one matrix product per chunk of shingles instead of one
hash object per record), which is what makes it several times faster than per-record MinHash objects.
Shingles shared by a large share of records (task instructions, prompt templates) are dropped first:
otherwise every record of an instruction dataset looks like every other. Clusters are the connected
components of candidate pairs whose estimated Jaccard similarity reaches the threshold; each cluster's
keeper is its lowest stable id, so the choice never depends on input order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sftflow.configs.schema import NearDedupConfig
from sftflow.tasks.dedup.exact import normalise

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for rolling the shingle hash
_CHUNK = 1 << 16  # shingles per matrix block: 65k x 128 perms x 8 bytes = 64 MiB


def words(text: str) -> list[str]:
    return _WORD.findall(normalise(text))


@lru_cache(maxsize=64)
def bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around the threshold (as datasketch)."""
    s = np.linspace(0.0, 1.0, 2001)
    lo, hi = s <= threshold, s >= threshold
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            err = np.trapezoid(p[lo], s[lo]) + np.trapezoid(1.0 - p[hi], s[hi])
            if err < best_err:
                best, best_err = (b, r), err
    return best


def shingles(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(record index, 64-bit shingle hash) pairs, unique per record; a text shorter than `size` words
    is one shingle of all its words, an empty one has none."""
    vocab: dict[str, int] = {}
    ids, lengths = [], []
    for t in texts:
        ws = words(t)
        ids.extend(vocab.setdefault(w, len(vocab)) for w in ws)
        lengths.append(len(ws))
    table = np.array([int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                      for w in vocab], dtype=np.uint64)
    codes = table[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    span = np.minimum(lengths, size)  # words per shingle for each record
    per_record = np.maximum(lengths - size + 1, (lengths > 0).astype(np.int64))
    rec = np.repeat(np.arange(len(texts)), per_record)
    first_shingle = np.concatenate([[0], np.cumsum(per_record)[:-1]]) if len(texts) else per_record
    pos = starts[rec] + np.arange(len(rec)) - first_shingle[rec]  # each shingle's first word in `codes`
    h = np.zeros(len(rec), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(size):
            take = j < span[rec]
            h[take] = h[take] * _MIX + codes[pos[take] + j]
    order = np.lexsort((h, rec))
    rec, h = rec[order], h[order]
    keep = np.ones(len(h), bool)
    keep[1:] = (rec[1:] != rec[:-1]) | (h[1:] != h[:-1])
    return rec[keep], h[keep]


def drop_boilerplate(rec: np.ndarray, h: np.ndarray, n_records: int, cfg: NearDedupConfig):
    """Drop shingles found in more than max(boilerplate_min, boilerplate_share * records) records."""
    uniq, inverse, df = np.unique(h, return_inverse=True, return_counts=True)
    limit = max(cfg.boilerplate_min, cfg.boilerplate_share * n_records)
    keep = df[inverse] <= limit
    return rec[keep], h[keep], int((df > limit).sum())


def signatures(rec: np.ndarray, h: np.ndarray, n_records: int, cfg: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 signatures [records x num_perm], has_shingles mask); multiply-shift hashing, min per record."""
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
    sig = np.full((n_records, cfg.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for lo in range(0, len(h), _CHUNK):
            r, x = rec[lo:lo + _CHUNK], h[lo:lo + _CHUNK]
            vals = ((x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
            seg = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            mins = np.minimum.reduceat(vals, seg, axis=0)
            sig[r[seg]] = np.minimum(sig[r[seg]], mins)  # a record may span two chunks
    present = np.zeros(n_records, bool)
    present[rec] = True
    return sig, present


def candidate_pairs(sig: np.ndarray, present: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """[k x 2] pairs (bucket leader, member) sharing at least one band bucket."""
    idx = np.flatnonzero(present)
    mult = np.random.default_rng(seed + 1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    with np.errstate(over="ignore"):
        for band in range(bands):
            keys = (sig[idx, band * rows:(band + 1) * rows].astype(np.uint64) * mult).sum(axis=1)
            order = np.argsort(keys, kind="stable")
            k = keys[order]
            new = np.r_[True, k[1:] != k[:-1]]
            leader = order[np.flatnonzero(new)[np.cumsum(new) - 1]]
            member = ~new
            pairs.append(np.stack([idx[leader[member]], idx[order[member]]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


@dataclass
class NearDuplicates:
    labels: np.ndarray  # cluster label per record (a record alone is its own cluster)
    keeper: dict[str, str]  # {id of a near-duplicate: id of its cluster's keeper}
    clusters: list[list[int]]  # record indices of clusters with 2+ members, largest first
    stats: dict


def near_duplicates(texts: list[str], ids: list[str], cfg: NearDedupConfig) -> NearDuplicates:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(texts)
    rec, h = shingles(texts, cfg.shingle)
    rec, h, boiler = drop_boilerplate(rec, h, n, cfg)
    sig, present = signatures(rec, h, n, cfg)
    bands, rows = bands_rows(cfg.threshold, cfg.num_perm)
    pairs = candidate_pairs(sig, present, bands, rows, cfg.seed)
    similar = np.zeros(len(pairs), bool)
    for lo in range(0, len(pairs), _CHUNK):
        p = pairs[lo:lo + _CHUNK]
        similar[lo:lo + _CHUNK] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1) >= cfg.threshold
    edges = pairs[similar]
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        members.setdefault(int(lab), []).append(i)
    clusters = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), min(ids[i] for i in m)))
    keeper = {}
    for m in clusters:
        keep = min(ids[i] for i in m)
        keeper.update({ids[i]: keep for i in m if ids[i] != keep})
    stats = {"bands": bands, "rows": rows, "candidate_pairs": len(pairs), "similar_pairs": int(similar.sum()),
             "boilerplate_shingles": boiler, "records_without_shingles": int(n - present.sum()),
             "clusters": len(clusters), "clustered_records": sum(map(len, clusters))}
    return NearDuplicates(labels=labels, keeper=keeper, clusters=clusters, stats=stats)
