"""Splits across data versions: a dataset D, its history recorded as a registered version would, then D' ⊇ D.

Every record of D keeps its split in D'; no test item of D, exact or near duplicate, trains in D'; new records
that would tie an earlier test item to earlier training data are rejected as bridges, with the ledger adding up.
"""
import json
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftflow import history
from sftflow.configs.schema import NearDedupConfig, SplitConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.data.dedup.exact import content_key
from sftflow.tasks.data.dedup.minhash import corpus_signatures, matches
from sftflow.tasks.data.split import split

VOCAB = [f"w{i}" for i in range(400)]
CFG = SplitConfig(seed=4, test_ratio=0.25, val_ratio=0.1, group_key="meta.conv",
                  decontam={"enabled": True, "ngram": 8})


def record(rid: str, text: str, conv: int) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
            "label": None, "source": "src", "file": "f.jsonl", "index": 1, "meta": {"conv": f"c{conv}"}}


def edited(text: str, rng: random.Random) -> str:
    """One word changed: a near duplicate (estimated Jaccard well above the threshold for 60-word texts)."""
    words = text.split()
    words[rng.randrange(len(words))] = rng.choice(VOCAB)
    return " ".join(words)


def run(tmp_path, name: str, records: list[dict], tag: str) -> dict:
    write_jsonl(tmp_path / f"{tag}.jsonl", records)
    out = tmp_path / tag
    out.mkdir()
    split(str(tmp_path / f"{tag}.jsonl"), CFG, out_dir=out, model_name=name)
    where = {r["id"]: s for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")}
    rejects = {r["id"]: r["reason"] for r in read_jsonl(out / "decontam_rejects.jsonl")}
    report = json.loads((out / "curation_report.json").read_text())
    return {"dir": out, "where": where, "rejects": rejects, "report": report}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n=st.integers(8, 40), fresh=st.integers(0, 30), edits=st.integers(0, 15),
       copies=st.integers(0, 5), convs=st.integers(3, 30))
def test_records_keep_their_split_and_earlier_test_items_never_train(tmp_path_factory, seed, n, fresh, edits,
                                                                     copies, convs):
    tmp_path = tmp_path_factory.mktemp("versions")
    name = f"prop-{seed}-{n}-{fresh}-{edits}-{copies}-{convs}"
    rng = random.Random(seed)
    text = lambda: " ".join(rng.choice(VOCAB) for _ in range(60))  # noqa: E731
    d = [record(f"d{i}", text(), rng.randrange(convs)) for i in range(n)]
    first = run(tmp_path, name, d, "d")
    history.record(name, 1, first["dir"], {"run_id": "r1"})

    extra = [record(f"f{i}", text(), rng.randrange(convs * 2)) for i in range(fresh)]
    extra += [record(f"e{i}", edited(rng.choice(d)["messages"][0]["content"], rng), rng.randrange(convs * 2))
              for i in range(edits)]
    extra += [record(f"c{i}", rng.choice(d)["messages"][0]["content"], rng.randrange(convs * 2)) for i in range(copies)]
    d2 = d + extra
    rng.shuffle(d2)
    second = run(tmp_path, name, d2, "d2")

    # every record of D keeps its split (or was removed for overlapping a new test item: removed, never moved)
    for rid, split_name in first["where"].items():
        assert second["where"].get(rid, split_name) == split_name, rid
        assert rid in second["where"] or second["rejects"][rid].startswith("contaminated")
    # no test item of D trains in D': not exactly, and not as a near duplicate by the pipeline's own MinHash
    test_d = [r for r in d if first["where"].get(r["id"]) == "test"]
    train_d2 = [r for r in d2 if second["where"].get(r["id"]) == "train"]
    assert not {content_key(r) for r in test_d} & {content_key(r) for r in train_d2}
    near = NearDedupConfig()
    texts = lambda rows: [r["messages"][0]["content"] for r in rows]  # noqa: E731
    if test_d and train_d2:
        sig_t, has_t = corpus_signatures(texts(test_d), near)
        sig_n, has_n = corpus_signatures(texts(train_d2), near)
        assert len(matches(sig_n, has_n, sig_t, has_t, near)) == 0
    # the ledger adds up; the history section counts what is new and what was seen
    ledger = second["report"]["accounting"]
    assert ledger["kept"] + ledger["contaminated"] + ledger["bridged"] == len(d2)
    assert sum(r == "bridges_earlier_splits" for r in second["rejects"].values()) == ledger["bridged"]
    seen = second["report"]["history"]
    assert seen["versions"] == [1] and seen["seen"] >= n and seen["new"] + seen["seen"] + seen["near_seen"] == len(d2)


def test_a_near_duplicate_of_an_earlier_test_item_goes_to_test_and_a_bridge_is_rejected(tmp_path):
    rng = random.Random(0)
    d = [record(f"d{i}", " ".join(rng.choice(VOCAB) for _ in range(60)), i) for i in range(40)]
    first = run(tmp_path, "bridge", d, "d")
    history.record("bridge", 1, first["dir"], {"run_id": "r1"})
    test_item = next(r for r in d if first["where"][r["id"]] == "test")
    train_item = next(r for r in d if first["where"][r["id"]] == "train")
    twin = record("twin", edited(test_item["messages"][0]["content"], rng), 999)
    # joined to earlier training data through its conversation, a twin of a test item bridges the two
    bridge = record("bridge", edited(test_item["messages"][0]["content"], rng), 0)
    bridge["meta"]["conv"] = train_item["meta"]["conv"]
    second = run(tmp_path, "bridge", d + [twin, bridge], "d2")
    assert second["where"]["twin"] == "test"
    assert second["rejects"] == {"bridge": "bridges_earlier_splits"}
    assert second["where"][train_item["id"]] == "train"
    examples = {e["record"]: e for e in second["report"]["history"]["examples"]}
    assert examples["twin"]["seen"] == "near" and examples["twin"]["id"] == test_item["id"]
    assert "bridging" in (second["dir"] / "curation_report.md").read_text()


def test_earlier_test_items_removed_from_the_data_still_keep_their_quotes_out_of_training(tmp_path):
    rng = random.Random(1)
    d = [record(f"d{i}", " ".join(rng.choice(VOCAB) for _ in range(60)), i) for i in range(40)]
    first = run(tmp_path, "gone", d, "d")
    history.record("gone", 1, first["dir"], {"run_id": "r1"})
    test_item = next(r for r in d if first["where"][r["id"]] == "test")
    # the test item leaves the data; a new record quotes 20 of its words (an n-gram overlap, not a near duplicate)
    quote = " ".join(test_item["messages"][0]["content"].split()[:20])
    quoting = [record(f"q{i}", quote + " " + " ".join(rng.choice(VOCAB) for _ in range(50)), 500 + i)
               for i in range(3)]  # few: an n-gram in many records is boilerplate
    second = run(tmp_path, "gone", [r for r in d if r is not test_item] + quoting, "d2")
    trained = [q["id"] for q in quoting if second["where"].get(q["id"]) == "train"]
    assert not trained
    assert all(second["rejects"].get(q["id"]) == "contaminated:test_split" or second["where"][q["id"]] != "train"
               for q in quoting)


def test_a_damaged_history_stops_the_split_naming_the_folder(tmp_path):
    import pytest

    d = [record(f"d{i}", f"text number {i} " * 5, i) for i in range(20)]
    first = run(tmp_path, "damaged", d, "d")
    path = history.record("damaged", 1, first["dir"], {"run_id": "r1"})
    (path / "signatures.npy").unlink()
    with pytest.raises(history.HistoryError, match=str(path)):
        run(tmp_path, "damaged", d, "d2")
    np.save(path / "signatures.npy", np.zeros((1, 128), np.uint32))
    with pytest.raises(history.HistoryError, match="signatures"):
        run(tmp_path, "damaged", d, "d3")
