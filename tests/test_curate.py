import json

from conftest import make_record

from sftflow.configs.schema import CurateConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.data.curate import curate
from sftflow.tasks.data.dedup.exact import normalise
from sftflow.tasks.data.filters import FILTERS, garbled, repetition


def run(tmp_path, records, tokenizer=None, **cfg):
    write_jsonl(tmp_path / "in.jsonl", records)
    return curate(str(tmp_path / "in.jsonl"), CurateConfig(**cfg), out_dir=tmp_path / "out", tokenizer=tokenizer)


def rejects(tmp_path):
    return {r["id"]: r for r in read_jsonl(tmp_path / "out" / "curate_rejects.jsonl")}


def test_normalise_ignores_case_width_and_whitespace():
    assert normalise("  Great\tMOVIE\n ") == normalise("great movie") == normalise("ｇｒｅａｔ movie")


def test_exact_duplicates_removed_lowest_id_kept_and_accounted(tmp_path):
    records = [make_record(3, "A fine film.", "POS"), make_record(1, "a  FINE film.", "pos"),
               make_record(2, "Dull.", "NEG"), make_record(0, "A fine film.", "POS")]
    out = run(tmp_path, records)
    kept = [r["id"] for r in read_jsonl(tmp_path / "out" / "curated.jsonl")]
    assert kept == ["r0002", "r0000"]  # input order kept; the keeper is the lowest id
    rej = rejects(tmp_path)
    assert {k: r["reason"] for k, r in rej.items()} == {"r0003": "exact_duplicate", "r0001": "exact_duplicate"}
    assert all(r["record"]["meta"]["duplicate_of"] == "r0000" for r in rej.values())
    c = out["counts"]
    assert c["records_in"] == c["kept"] + c["rejected"] + c["exact_dup"] + c["near_dup"] == 4 and c["exact_dup"] == 2


def test_each_filter_fires_with_its_own_reason_and_provenance(tmp_path):
    planted = {
        "turn_too_short": make_record(1, "x", "POS", label="POS"),
        "too_many_chars": make_record(2, "long " * 100, "NEG", label="NEG"),
        "garbled": make_record(3, "ok\x00\x01\x02\x03\ufffd\ufffd text", "POS", label="POS"),
        "repetitive": make_record(4, "buy now " * 30, "POS", label="POS"),
        "boilerplate": make_record(5, "Is this a fine review?", "As an AI language model, I cannot say.", label="NEG"),
        "label_not_allowed": make_record(6, "a fine input", "MAYBE", label="MAYBE"),
    }
    good = make_record(0, "a normal review of a film", "POS", label="POS")
    out = run(tmp_path, [good, *planted.values()], min_chars=2, max_chars=300, allowed_labels=["POS", "NEG"],
              near_dedup={"enabled": False})
    assert out["counts"]["by_reason"] == {rule: 1 for rule in planted}
    assert set(planted) | {"too_few_tokens", "too_many_tokens"} == set(FILTERS)
    assert out["metrics"]["curate/kept"] == 1 and out["metrics"]["curate/removed/garbled"] == 1
    rej = rejects(tmp_path)
    for rule, record in planted.items():
        row = rej[record["id"]]
        assert row["reason"] == rule and (row["file"], row["index"], row["source"]) == ("f.jsonl", record["index"], "src")


def test_token_filters_use_the_templated_token_count(tmp_path, tiny_tokenizer, tiny_model):
    short, long = make_record(0, "hi", "yes"), make_record(1, " ".join(f"word{i}" for i in range(60)), "no")
    n_short = len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(short["messages"], tokenize=False),
                                 add_special_tokens=False)["input_ids"])
    out = run(tmp_path, [short, long], tokenizer=tiny_model, min_tokens=n_short + 1, near_dedup={"enabled": False})
    assert out["counts"]["by_reason"] == {"too_few_tokens": 1}
    assert rejects(tmp_path)["r0000"]["record"]["meta"]["tokens"] == n_short
    out = run(tmp_path, [short, long], tokenizer=tiny_model, max_tokens=n_short + 5, near_dedup={"enabled": False})
    assert out["counts"]["by_reason"] == {"too_many_tokens": 1}


def test_filter_measures():
    assert repetition("the cat sat on the mat " * 10) > 0.7 and repetition("a short text") == 0.0
    assert repetition("one two three four five six seven eight nine ten eleven twelve") == 0.0
    assert garbled("plain text\nwith newline\t") == 0.0 and garbled("\x00\x00ab") == 0.5


def test_clean_data_passes_untouched(tmp_path):
    records = [make_record(i, f"review number {i} says something different about film {i * 7}", "POS" if i % 2 else "NEG")
               for i in range(20)]
    out = run(tmp_path, records)
    assert out["counts"]["kept"] == 20 and out["counts"]["rejected"] == 0
    assert list(read_jsonl(tmp_path / "out" / "curated.jsonl")) == records


def test_unchanged_rerun_is_a_cache_hit(tmp_path):
    records = [make_record(i, f"text {i}", "POS") for i in range(5)] + [make_record(9, "text 1", "POS")]
    first = run(tmp_path, records)
    assert first["metrics"]["curate/cache_hit"] == 0
    (tmp_path / "out" / "curated.jsonl").unlink()
    again = run(tmp_path, records)
    assert again["metrics"]["curate/cache_hit"] == 1 and again["counts"] == first["counts"]
    assert len(list(read_jsonl(again["records"]))) == 5  # files restored from the cache entry
    changed = run(tmp_path, records, max_chars=5000)
    assert changed["metrics"]["curate/cache_hit"] == 0
    assert json.loads((tmp_path / "out" / "curation_counts.json").read_text())["exact_dup"] == 1


def test_allowed_labels_check_the_final_assistant_turn_of_records_without_a_label(tmp_path):
    records = [make_record(0, "review one, a good film", " positive\n"),
               make_record(1, "review two, a dull film", "negative"),
               make_record(2, "review three", "Sure! Here is my take on it."),
               make_record(3, "review four, labelled", "whatever text", label="positive")]
    out = run(tmp_path, records, allowed_labels=["positive", "negative"], near_dedup={"enabled": False})
    assert [r["id"] for r in read_jsonl(out["records"])] == ["r0000", "r0001", "r0003"]
    assert rejects(tmp_path)["r0002"]["reason"] == "label_not_allowed" and out["counts"]["dominant"] == []


def test_a_rule_removing_most_of_the_data_is_named_with_count_and_example(tmp_path):
    records = [make_record(i, f"question {i} about something", f"A long answer number {i}.") for i in range(9)]
    records.append(make_record(9, "question nine", "positive"))
    out = run(tmp_path, records, allowed_labels=["positive", "negative"], near_dedup={"enabled": False})
    [d] = out["counts"]["dominant"]
    assert (d["rule"], d["count"], d["records_in"]) == ("label_not_allowed", 9, 10) and "allowed_labels" in d["hint"]
    assert d["example"] == {"id": "r0000", "file": "f.jsonl", "index": 1,
                            "text": "user: 'question 0 about something' -> assistant: 'A long answer number 0.'"}
