import random

import numpy as np
import pytest

from sftflow.configs.schema import NearDedupConfig, Source
from sftflow.tasks.data.curate import dedup_text
from sftflow.tasks.data.dedup.exact import duplicates
from sftflow.tasks.data.dedup.minhash import bands_rows, near_duplicates, shingles, signatures
from sftflow.tasks.data.load import load_source


def perturb(text: str, rng: random.Random, edits: int = 1) -> str:
    ws = text.split()
    for _ in range(edits):
        ws[rng.randrange(len(ws))] = rng.choice(["indeed", "really", "quite"])
    return " ".join(ws)


@pytest.fixture(scope="module")
def reviews(data_root):
    """Real SuperNI records: one shared task definition per task, distinct inputs."""
    recs = []
    for task in ("task888_reviews_classification", "task1312_amazonreview_polarity_classification"):
        recs += load_source(Source(path=f"natural-instructions/tasks/{task}.json", max_records=150), data_root)[0]
    return recs


def test_planted_near_duplicates_are_clustered_and_clean_records_are_not(reviews):
    rng = random.Random(0)
    originals = [r for r in reviews if len(dedup_text(r).split()) > 60][:40]
    texts = [dedup_text(r) for r in reviews] + [perturb(dedup_text(r), rng) for r in originals]
    ids = [r["id"] for r in reviews] + [f"zz-copy-{i:02d}" for i in range(len(originals))]
    planted = dict(zip(ids[len(reviews):], (r["id"] for r in originals)))
    near = near_duplicates(texts, ids, NearDedupConfig(threshold=0.7))
    found = sum(near.keeper.get(c) == min(c, o) or near.keeper.get(o) == min(c, o) for c, o in planted.items())
    assert found / len(planted) >= 0.95
    # the shared task definition is boilerplate: unrelated reviews of the same task are not clustered
    assert near.stats["clustered_records"] <= 2 * len(planted) + 4 and near.stats["boilerplate_shingles"] > 20


def test_keeper_is_lowest_id_whatever_the_order():
    base = "the film was a long and patient study of grief that rewards attention and never once feels slow"
    texts = [base, base.replace("never", "not"), "something else entirely about cooking pasta at home tonight"]
    cfg = NearDedupConfig(threshold=0.5, boilerplate_min=50)
    a = near_duplicates(texts, ["b2", "a1", "c3"], cfg)
    b = near_duplicates(texts[::-1], ["c3", "a1", "b2"], cfg)
    assert a.keeper == b.keeper == {"b2": "a1"}


def test_signatures_estimate_jaccard():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    x = list(rng.choice(vocab, 400))
    y = x[:300] + list(rng.choice(vocab, 100))
    cfg = NearDedupConfig(num_perm=256, shingle=1, boilerplate_min=10)
    rec, h = shingles([" ".join(x), " ".join(y)], 1)
    sig, present = signatures(rec, h, 2, cfg)
    true = len(set(x) & set(y)) / len(set(x) | set(y))
    assert present.all() and abs((sig[0] == sig[1]).mean() - true) < 0.08


def test_bands_match_datasketch_choice():
    from datasketch.lsh import _optimal_param

    for t, p in ((0.8, 128), (0.5, 64), (0.9, 256)):
        assert bands_rows(t, p) == _optimal_param(t, p, 0.5, 0.5)


def test_short_and_empty_texts():
    near = near_duplicates(["ok", "ok", "", ""], ["a", "b", "c", "d"], NearDedupConfig(boilerplate_min=10))
    assert near.keeper == {"b": "a"} and near.stats["records_without_shingles"] == 2


def test_exact_duplicates_map_to_lowest_id():
    recs = [{"id": i, "messages": [{"role": "user", "content": t}]} for i, t in (("b", "Hi  There"), ("a", "hi there"),
                                                                               ("c", "other"))]
    assert duplicates(recs) == {"b": "a"}
