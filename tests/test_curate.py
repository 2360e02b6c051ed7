from conftest import make_record

from sftflow.configs.schema import CurateConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.curate import curate, normalise


def run(tmp_path, records, **cfg):
    write_jsonl(tmp_path / "in.jsonl", records)
    return curate(str(tmp_path / "in.jsonl"), CurateConfig(**cfg), out_dir=tmp_path)


def test_normalise_ignores_case_width_and_whitespace():
    assert normalise("  Great\tMOVIE\n ") == normalise("great movie") == normalise("ｇｒｅａｔ movie")


def test_exact_duplicates_removed_first_kept_and_accounted(tmp_path):
    records = [make_record(0, "A fine film.", "POS"), make_record(1, "a  FINE film.", "pos"),
               make_record(2, "Dull.", "NEG"), make_record(3, "A fine film.", "POS")]
    out = run(tmp_path, records)
    kept = [r["id"] for r in read_jsonl(tmp_path / "curated.jsonl")]
    assert kept == ["r0000", "r0002"]
    rejects = list(read_jsonl(tmp_path / "curate_rejects.jsonl"))
    assert {r["id"]: r["reason"] for r in rejects} == {"r0001": "exact_duplicate", "r0003": "exact_duplicate"}
    assert all(r["record"]["meta"]["duplicate_of"] == "r0000" for r in rejects)
    c = out["counts"]
    assert c["records_in"] == c["kept"] + c["rejected"] == 4


def test_each_filter_fires_with_its_own_reason_and_provenance(tmp_path):
    no_answer = make_record(3, "question", "x")
    no_answer["messages"] = no_answer["messages"][:1]
    records = [make_record(0, "ok input", "POS", label="POS"), make_record(1, "", "POS", label="POS"),
               make_record(2, "x" * 500, "NEG", label="NEG"), no_answer,
               make_record(4, "fine input", "MAYBE", label="MAYBE")]
    out = run(tmp_path, records, max_chars=200, allowed_labels=["POS", "NEG"])
    assert out["counts"]["by_reason"] == {"turn_too_short": 1, "too_long": 1, "no_final_assistant_turn": 1,
                                          "label_not_allowed": 1}
    assert out["metrics"]["curate/kept"] == 1 and out["metrics"]["curate/rejected/too_long"] == 1
    reject = next(r for r in read_jsonl(tmp_path / "curate_rejects.jsonl") if r["reason"] == "too_long")
    assert (reject["file"], reject["index"], reject["source"]) == ("f.jsonl", 3, "src")


def test_clean_data_passes_untouched(tmp_path):
    records = [make_record(i, f"review number {i}", "POS" if i % 2 else "NEG") for i in range(20)]
    out = run(tmp_path, records)
    assert out["counts"]["kept"] == 20 and out["counts"]["rejected"] == 0
    assert list(read_jsonl(tmp_path / "curated.jsonl")) == records
