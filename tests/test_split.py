import json
from collections import Counter

from conftest import make_record

from sftflow.configs.schema import SplitConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.split import assign, split


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


def test_split_is_stratified_by_label():
    parts = assign(records(400), SplitConfig(val_ratio=0.1, test_ratio=0.2, seed=0))
    for name, share in (("test", 0.2), ("val", 0.1)):
        labels = Counter(r["label"] for r in parts[name])
        assert labels["NEG"] == round(100 * share) and labels["POS"] == round(300 * share)


def test_split_writes_files_and_manifests(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(50))
    out = split(str(tmp_path / "in.jsonl"), SplitConfig(), out_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for name in ("train", "val", "test"):
        rows = list(read_jsonl(tmp_path / f"{name}.jsonl"))
        assert manifest[name]["ids"] == [r["id"] for r in rows]
        assert out["metrics"][f"split/{name}"] == len(rows)
    assert sum(out["metrics"].values()) == 50
    # the content hash moves when content does
    changed = records(50)
    changed[0]["messages"][0]["content"] += "!"
    write_jsonl(tmp_path / "in2.jsonl", changed)
    (tmp_path / "b").mkdir()
    out2 = split(str(tmp_path / "in2.jsonl"), SplitConfig(), out_dir=tmp_path / "b")
    assert out2["digests"] != out["digests"]
