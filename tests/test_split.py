import json
from collections import Counter

import pytest
from conftest import make_record

from sftflow.configs.schema import SplitConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.data.split import account, assign, shares, split

NO_DECONTAM = {"decontam": {"enabled": False}}


def records(n=200):
    return [make_record(i, f"text {i}", "POS" if i % 4 else "NEG", label="POS" if i % 4 else "NEG") for i in range(n)]


def ids(parts):
    return {k: [r["id"] for r in v] for k, v in parts.items()}


def test_split_is_complete_disjoint_and_reproducible():
    recs = records()
    a = ids(assign(recs, SplitConfig(seed=7)))
    assert ids(assign(recs, SplitConfig(seed=7))) == a
    assert ids(assign(recs, SplitConfig(seed=8))) != a
    flat = a["train"] + a["val"] + a["test"]
    assert sorted(flat) == sorted(r["id"] for r in recs) and len(set(flat)) == len(flat)


def test_each_stratum_matches_the_ratios_within_the_stated_tolerance():
    cfg = SplitConfig(val_ratio=0.1, test_ratio=0.2, seed=0)
    parts = assign(records(4000), cfg)
    table = shares(parts, cfg)
    assert set(table) == {"src|NEG", "src|POS"} and table["src|NEG"]["records"] == 1000
    for row in table.values():
        for name, ratio in (("test", 0.2), ("val", 0.1)):
            assert row[name]["within"] and abs(row[name]["share"] - ratio) <= row[name]["tolerance"] < 0.05
    # the tolerance is what sampling noise allows: 3 standard deviations of a binomial share
    assert table["src|NEG"]["test"]["tolerance"] == pytest.approx(3 * (0.2 * 0.8 / 1000) ** 0.5, abs=1e-4)


def test_category_names_the_stratum_when_there_is_no_label():
    recs = [make_record(i, f"t{i}", "a") for i in range(100)]
    for i, r in enumerate(recs):
        r["meta"]["category"] = "qa" if i < 20 else "chat"
    cfg = SplitConfig(test_ratio=0.2, val_ratio=0.0)
    assert {k: v["records"] for k, v in shares(assign(recs, cfg), cfg).items()} == {"src|qa": 20, "src|chat": 80}


def test_a_groups_split_never_depends_on_the_other_records():
    recs = records(300)
    alone = {r["id"]: s for s, rows in assign(recs[:50], SplitConfig(seed=3)).items() for r in rows}
    together = {r["id"]: s for s, rows in assign(recs, SplitConfig(seed=3)).items() for r in rows}
    assert all(together[k] == v for k, v in alone.items())


def test_clusters_and_group_keys_never_straddle_splits():
    recs = records(300)
    for i, r in enumerate(recs):
        if i % 10 < 4:  # clusters of 4 near duplicates
            r["meta"]["near_dup_cluster"] = f"r{i - i % 10:04d}"
        r["meta"]["conversation"] = f"conv{i // 3}"
    for cfg in (SplitConfig(seed=1), SplitConfig(seed=2, group_key="meta.conversation")):
        parts = assign(recs, cfg)
        where = {r["id"]: s for s, rows in parts.items() for r in rows}
        clusters, convs = {}, {}
        for r in recs:
            if "near_dup_cluster" in r["meta"]:
                clusters.setdefault(r["meta"]["near_dup_cluster"], set()).add(where[r["id"]])
            convs.setdefault(r["meta"]["conversation"], set()).add(where[r["id"]])
        assert all(len(s) == 1 for s in clusters.values()) and len(clusters) == 30
        if cfg.group_key:
            assert all(len(s) == 1 for s in convs.values())
        assert 0 < len(parts["test"]) and 0 < len(parts["val"])


def test_split_writes_files_and_manifests_bit_for_bit(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(50))
    out = split(str(tmp_path / "in.jsonl"), SplitConfig(**NO_DECONTAM), out_dir=tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name in ("train", "val", "test"):
        rows = list(read_jsonl(tmp_path / "a" / f"{name}.jsonl"))
        assert manifest[name]["ids"] == [r["id"] for r in rows]
        assert out["metrics"][f"split/{name}"] == len(rows)
    assert sum(out["metrics"][f"split/{n}"] for n in ("train", "val", "test")) == 50
    # a fresh computation (no cache: other seed, then back) gives the same bytes
    split(str(tmp_path / "in.jsonl"), SplitConfig(seed=5, **NO_DECONTAM), out_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    again = split(str(tmp_path / "in.jsonl"), SplitConfig(**NO_DECONTAM), out_dir=tmp_path / "c")
    assert again["digests"] == out["digests"]
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "c" / "train.jsonl").read_bytes()
    # the content hash moves when content does
    changed = records(50)
    changed[0]["messages"][0]["content"] += "!"
    write_jsonl(tmp_path / "in2.jsonl", changed)
    out2 = split(str(tmp_path / "in2.jsonl"), SplitConfig(**NO_DECONTAM), out_dir=tmp_path / "d")
    assert out2["digests"] != out["digests"]


def test_train_records_overlapping_the_test_split_are_removed(tmp_path):
    recs = [make_record(i, f"Rate the review. Review {i}: " + " ".join(f"w{i}x{j}" for j in range(20)), "POS")
            for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", recs)
    clean = split(str(tmp_path / "in.jsonl"), SplitConfig(seed=3), out_dir=tmp_path / "a")
    assert clean["metrics"]["split/contaminated"] == 0
    test_ids = [r["id"] for r in read_jsonl(clean["paths"]["test"])]
    leaked_from = next(r for r in recs if r["id"] == test_ids[0])
    # a train record quoting half of a test record (not a near duplicate of it)
    quoting = make_record(99, "Compare: " + leaked_from["messages"][0]["content"][-120:] + " and more words here", "NEG")
    write_jsonl(tmp_path / "in2.jsonl", recs + [quoting])
    out = split(str(tmp_path / "in2.jsonl"), SplitConfig(seed=3), out_dir=tmp_path / "b")
    assert "r0099" in [r["id"] for r in read_jsonl(out["paths"]["train"])] + \
        [r["id"] for r in read_jsonl(tmp_path / "b" / "decontam_rejects.jsonl")]  # seeded: it was cut into train
    rejects = list(read_jsonl(tmp_path / "b" / "decontam_rejects.jsonl"))
    assert [(r["id"], r["reason"]) for r in rejects] == [("r0099", "contaminated:test_split")]
    assert rejects[0]["record"]["meta"]["contaminated_by"]["item"] == leaked_from["id"]


def test_accounting_raises_when_a_record_is_missing():
    up = {"load": {"rows": 10, "rejected": 1}, "curate": {"rejected": 2, "exact_dup": 1, "near_dup": 1}}
    parts = {"train": [{}] * 3, "val": [{}], "test": [{}]}
    assert account(up, 5, parts, 0)["kept"] == 5
    with pytest.raises(AssertionError, match="does not add up"):
        account(up, 5, {**parts, "test": []}, 0)


def test_each_split_is_logged_as_an_mlflow_dataset(tmp_path):
    import mlflow

    write_jsonl(tmp_path / "in.jsonl", records(30))
    with mlflow.start_run() as run:
        out = split(str(tmp_path / "in.jsonl"), SplitConfig(**NO_DECONTAM), out_dir=tmp_path / "a")
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["test", "train", "val"]
    assert all(i.dataset.digest for i in inputs)
    assert any(out["paths"]["train"] in i.dataset.source for i in inputs), [i.dataset.source for i in inputs]
