"""Near dedup: MinHash signatures over word shingles, banded LSH buckets, verified pairs, components.

Vectorised over the whole corpus with numpy (one matrix product per chunk of shingles instead of one
hash object per record), which is what makes it several times faster than per-record MinHash objects.
Shingles shared by a large share of records (task instructions, prompt templates) are dropped first:
otherwise every record of an instruction dataset looks like every other. Clusters are the connected
components of candidate pairs whose estimated Jaccard similarity reaches the threshold; each cluster's
keeper is its lowest stable id, so the choice never depends on input order.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sftflow.configs.schema import NearDedupConfig

_WORD = re.compile(r"\w+")
_TOKEN = re.compile(r"\w+|\x00")
_HASH_KEY = "sftflow-minhash1"  # 16 bytes: fixed, so word hashes are the same in every process
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for rolling the shingle hash
_CHUNK = 1 << 16  # candidate pairs verified at a time
_BLOCK = 4096  # shingles hashed at a time: 4096 x 128 perms x 8 bytes = 4 MiB


def words(text: str) -> list[str]:
    """Lower-cased (NFKC, casefold) word tokens, as `word_codes` sees them."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


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


def word_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word of every text, words per text): one regex pass over the whole batch."""
    import pandas as pd

    batch = "\x00".join(t.replace("\x00", " ") if t.isascii() else unicodedata.normalize("NFKC", t.replace("\x00", " "))
                        for t in texts).casefold()  # NFKC leaves ASCII alone: skip the call there
    tokens = _TOKEN.findall(batch)  # words, and one \x00 between texts
    codes, uniques = pd.factorize(np.asarray(tokens, dtype=object))
    hashes = pd.util.hash_array(np.asarray(uniques, dtype=object), hash_key=_HASH_KEY)
    is_break = codes == next((i for i, u in enumerate(uniques) if u == "\x00"), -1)
    text_of = np.cumsum(is_break)[~is_break]  # which text each word belongs to
    return hashes[codes[~is_break]], np.bincount(text_of, minlength=len(texts)).astype(np.int64)


def shingles(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(record index, 64-bit shingle hash) pairs, unique per record; a text shorter than `size` words
    is one shingle of all its words, an empty one has none."""
    codes, lengths = word_codes(texts)
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
    buf = np.empty((_BLOCK, cfg.num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, len(h), _BLOCK):  # blocks small enough to stay in cache
            r, x = rec[lo:lo + _BLOCK], h[lo:lo + _BLOCK]
            vals = np.multiply(x[:, None], a[None, :], out=buf[:len(x)])
            vals += b
            vals >>= np.uint64(32)
            seg = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            mins = np.minimum.reduceat(vals, seg, axis=0).astype(np.uint32)
            sig[r[seg]] = np.minimum(sig[r[seg]], mins)  # a record may span two blocks
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


def corpus_signatures(texts: list[str], cfg: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(signatures, has_shingles) of texts as `near_duplicates` computes them (boilerplate of this corpus dropped)."""
    rec, h = shingles(texts, cfg.shingle)
    rec, h, _ = drop_boilerplate(rec, h, len(texts), cfg)
    return signatures(rec, h, len(texts), cfg)


def _band_keys(sig: np.ndarray, band: int, rows: int, mult: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (sig[:, band * rows:(band + 1) * rows].astype(np.uint64) * mult).sum(axis=1)


def matches(new: np.ndarray, new_present: np.ndarray, seen: np.ndarray, seen_present: np.ndarray,
            cfg: NearDedupConfig) -> np.ndarray:
    """[k x 2] (new row, seen row) pairs whose estimated Jaccard similarity reaches the threshold; every pair
    sharing a band bucket is verified (a join per band, not a bucket leader), so no match is left out."""
    bands, rows = bands_rows(cfg.threshold, cfg.num_perm)
    mult = np.random.default_rng(cfg.seed + 1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    new_idx, seen_idx = np.flatnonzero(new_present), np.flatnonzero(seen_present)
    found = []
    for band in range(bands if len(new_idx) and len(seen_idx) else 0):
        ks, kn = _band_keys(seen[seen_idx], band, rows, mult), _band_keys(new[new_idx], band, rows, mult)
        order = np.argsort(ks, kind="stable")
        lo, hi = np.searchsorted(ks[order], kn, "left"), np.searchsorted(ks[order], kn, "right")
        count = hi - lo
        a = np.repeat(np.arange(len(kn)), count)
        b = order[np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)]
        found.append(np.stack([new_idx[a], seen_idx[b]], axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    similar = (new[pairs[:, 0]] == seen[pairs[:, 1]]).mean(axis=1) >= cfg.threshold
    return pairs[similar]
