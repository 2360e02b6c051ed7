import json
from pathlib import Path

import pytest

from sftflow.configs.schema import DataConfig, Source
from sftflow.records import read_jsonl
from sftflow.tasks.data.load import DataError, load, load_source

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_messages_jsonl_keeps_provenance_and_roles(tmp_path):
    write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": "4"},
    ])
    records, rejects, available = load_source(Source(path="chat.jsonl"), tmp_path)
    assert available == 2 and not rejects
    assert [r["index"] for r in records] == [1, 2]  # 1-based line numbers
    assert records[0]["file"] == "chat.jsonl" and records[0]["source"] == "chat"
    assert [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant"]
    assert records[1]["label"] == "4" and records[0]["meta"]["format"] == "messages"


def test_prompt_completion_json_list(tmp_path):
    (tmp_path / "pc.json").write_text(json.dumps([{"prompt": "Say yes", "completion": "yes"}]))
    records, _, _ = load_source(Source(path="pc.json"), tmp_path)
    assert records[0]["messages"] == [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]
    assert records[0]["index"] == 0 and records[0]["meta"]["format"] == "prompt_completion"


def test_superni_task_file(data_root):
    src = Source(path="natural-instructions/tasks/task888_reviews_classification.json", max_records=20)
    records, rejects, available = load_source(src, data_root, seed=0)
    assert available == 500 and len(records) == 20 and not rejects
    r = records[0]
    assert r["label"] in {"positive", "negative"} and r["messages"][-1]["content"] == r["label"]
    assert r["messages"][0]["content"].startswith("Classify given movie review")
    assert r["meta"]["native_id"].startswith("task888-")
    again, _, _ = load_source(src, data_root, seed=0)
    other, _, _ = load_source(src, data_root, seed=1)
    assert [x["id"] for x in again] == [x["id"] for x in records]  # seeded and stable
    assert [x["id"] for x in other] != [x["id"] for x in records]


def test_malformed_rows_are_rejected_with_reason_not_dropped(tmp_path):
    write(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "wizard", "content": "a"}]},
        {"text": "no known format"},
    ])
    out = load(DataConfig(root=str(tmp_path), sources=[Source(path="mixed.jsonl")]), tmp_path / "out")
    assert out["metrics"]["load/records"] == 1 and out["metrics"]["load/rejected"] == 2
    rejects = list(read_jsonl(tmp_path / "out" / "load_rejects.jsonl"))
    assert [r["index"] for r in rejects] == [2, 3]
    assert "role" in rejects[0]["reason"] and "no known format" in rejects[1]["reason"]


def test_invalid_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_source(Source(path="bad.jsonl"), tmp_path, on_bad_record="fail")
    records, rejects, _ = load_source(Source(path="bad.jsonl"), tmp_path)  # the default: reject the line only
    assert len(records) == 1 and (rejects[0]["index"], rejects[0]["reason"][:12]) == (2, "invalid JSON")


def test_missing_data_root_explains_how_to_point_at_it(tmp_path):
    with pytest.raises(DataError, match=r"data.root"):
        load_source(Source(path="natural-instructions/tasks/*.json"), tmp_path / "nowhere")


def test_duplicate_source_names_are_refused(tmp_path):
    write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    cfg = DataConfig(root=str(tmp_path), sources=[Source(path="a.jsonl", name="x"), Source(path="a.jsonl", name="x")])
    with pytest.raises(DataError, match="distinct"):
        load(cfg, tmp_path / "out")



@pytest.mark.parametrize("file, fmt, first", [
    ("alpaca.json", "alpaca", [{"role": "user", "content": "Give the opposite word.\n\nhot"},
                               {"role": "assistant", "content": "cold"}]),
    ("dolly.jsonl", "dolly", [{"role": "user", "content": "When was the bridge opened?\n\nThe bridge opened to traffic in 1937."},
                              {"role": "assistant", "content": "In 1937."}]),
    ("sharegpt.json", "sharegpt", [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Capital of France?"},
                                   {"role": "assistant", "content": "Paris."},
                                   {"role": "user", "content": "And of Italy?"},
                                   {"role": "assistant", "content": "Rome."}]),
    ("messages.jsonl", "messages", [{"role": "system", "content": "Answer with a label."},
                                    {"role": "user", "content": "Great film!"},
                                    {"role": "assistant", "content": "positive"}]),
    ("prompt_completion.csv", "prompt_completion", [{"role": "user", "content": 'Is "Great film" positive?'},
                                                    {"role": "assistant", "content": "yes"}]),
    ("task999_tiny.json", "superni", [{"role": "user", "content": "Classify the review as positive or negative.\n\nI loved it."},
                                      {"role": "assistant", "content": "positive"}]),
])
def test_each_format_is_detected_and_converted(file, fmt, first):
    for declared in ("auto", fmt):
        records, _, available = load_source(Source(path=file, format=declared), FIXTURES)
        assert available == 2 and records[0]["messages"] == first and records[0]["meta"]["format"] == fmt
        assert records[0]["file"] == file and records[0]["source"] == file.rsplit(".", 1)[0]
        assert len({r["id"] for r in records}) == len(records)


def test_format_extras_keep_category_label_and_provenance():
    dolly, _, _ = load_source(Source(path="dolly.jsonl"), FIXTURES)
    assert [r["meta"]["category"] for r in dolly] == ["closed_qa", "brainstorming"]
    assert dolly[1]["messages"][0]["content"] == "Suggest a name for a cat."  # empty context adds nothing
    csv_rows, _, _ = load_source(Source(path="prompt_completion.csv"), FIXTURES)
    assert [r["index"] for r in csv_rows] == [2, 3]  # the line each row starts on, after the header
    assert csv_rows[1]["label"] == "no" and csv_rows[1]["messages"][0]["content"] == "A prompt\nover two lines"
    chat, _, _ = load_source(Source(path="messages.jsonl"), FIXTURES)
    assert [r["meta"]["conversation_id"] for r in chat] == ["c1", "c2"]
    ni, _, _ = load_source(Source(path="task999_tiny.json"), FIXTURES)
    assert ni[1]["label"] == "negative" and ni[1]["meta"]["native_id"] == "task999-b"


def test_sharegpt_unknown_speaker_is_rejected_with_its_position():
    records, rejects, _ = load_source(Source(path="sharegpt.json"), FIXTURES)
    assert len(records) == 1 and rejects[0]["index"] == 1 and "conversations[1]" in rejects[0]["reason"]


def test_parquet_and_declared_format_mismatch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "messages.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{**r, "messages": json.dumps(r["messages"])} for r in rows]),
                   tmp_path / "chat.parquet")
    records, _, _ = load_source(Source(path="chat.parquet"), tmp_path)
    assert [r["index"] for r in records] == [0, 1] and records[1]["messages"][1]["content"] == "negative"
    with pytest.raises(DataError, match="no usable record"):
        load_source(Source(path="alpaca.json", format="dolly"), FIXTURES)


def test_unsupported_file_type_names_the_file(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'"):
        load_source(Source(path="data.txt"), tmp_path)


def test_several_sources_with_weight_and_max_count_are_seeded(tmp_path, data_root):
    task = "natural-instructions/tasks/task888_reviews_classification.json"
    cfg = DataConfig(root=str(data_root), seed=3, sources=[Source(path=task, name="a", weight=0.1),
                                                           Source(path=task, name="b", max_records=7, weight=0.5)])
    out = load(cfg, tmp_path / "o")
    assert out["ledger"]["per_source"] == {"a": {"available": 500, "loaded": 50, "rejected": 0},
                                           "b": {"available": 500, "loaded": 7, "rejected": 0}}
    again = load(cfg, tmp_path / "o2")
    assert again["metrics"]["load/cache_hit"] == 1
    assert (tmp_path / "o" / "records.jsonl").read_bytes() == (tmp_path / "o2" / "records.jsonl").read_bytes()


def chat_line(i, answer="yes"):
    return json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": answer}]})


def test_every_kind_of_bad_line_is_a_reject_with_file_line_and_reason(tmp_path):
    lines = [chat_line(1).encode(),
             b'{"messages": [oops',  # invalid JSON
             chat_line(3).encode()[:-3] + b'\xff\xfe"}]}',  # not UTF-8
             b"",  # blank: layout, not a record
             json.dumps({"text": "no known format"}).encode(),  # wrong schema
             json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),  # unknown role
             json.dumps({"prompt": "p", "completion": "c" * 500}).encode(),  # oversize
             b"[1, 2]",  # not an object
             json.dumps({"prompt": "a\ud800b", "completion": "c"}).encode(),  # escaped lone surrogate
             chat_line(10).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines))  # no final newline
    cfg = DataConfig(root=str(tmp_path), sources=[Source(path="mixed.jsonl")])
    from sftflow.configs.schema import CurateConfig

    out = load(cfg, tmp_path / "out", CurateConfig(max_record_bytes=400))
    rejects = list(read_jsonl(tmp_path / "out" / "load_rejects.jsonl"))
    kinds = {r["index"]: r["reason"].split(":")[0] for r in rejects}
    assert kinds == {2: "invalid JSON", 3: "not UTF-8", 5: "wrong schema", 6: "unknown role", 7: "oversize",
                     8: "wrong schema", 9: "not UTF-8"}
    assert all(r["file"] == "mixed.jsonl" and r["stage"] == "load" for r in rejects)
    assert "0xff" in next(r["reason"] for r in rejects if r["index"] == 3)
    assert [r["index"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")] == [1, 10]
    assert out["ledger"]["rows"] == 9 == out["metrics"]["load/records"] + out["metrics"]["load/rejected"]
    assert out["ledger"]["by_reason"] == {"invalid JSON": 1, "not UTF-8": 2, "oversize": 1, "unknown role": 1,
                                          "wrong schema": 2}
    with pytest.raises(DataError, match=r"^mixed.jsonl:2: invalid JSON: .*on_bad_record: fail"):
        load(cfg, tmp_path / "fail", CurateConfig(on_bad_record="fail"))


def test_oversize_line_is_skipped_without_reading_it_whole(tmp_path):
    huge = json.dumps({"prompt": "p", "completion": "x" * 3_000_000})
    (tmp_path / "big.jsonl").write_text(chat_line(1) + "\n" + huge + "\n" + chat_line(3) + "\n")
    records, rejects, _ = load_source(Source(path="big.jsonl"), tmp_path, max_record_bytes=1000)
    assert [r["index"] for r in records] == [1, 3] and rejects[0]["index"] == 2
    assert rejects[0]["reason"].startswith(f"oversize: {len(huge)} bytes") and len(rejects[0]["record"]["raw"]) < 400


def test_bad_rows_of_csv_json_and_parquet_are_rejected_not_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pc.csv").write_bytes(b'prompt,completion\nfine,yes\nextra,cells,here\nbad \xff byte,no\nok,sure\n')
    records, rejects, _ = load_source(Source(path="pc.csv"), tmp_path)
    assert [r["index"] for r in records] == [2, 5]
    assert {r["index"]: r["reason"].split(":")[0] for r in rejects} == {3: "wrong schema", 4: "not UTF-8"}
    (tmp_path / "rows.json").write_bytes(b'[{"prompt": "a", "completion": "b"}, 7, {"prompt": "c\xff", '
                                         b'"completion": "d"}, {"prompt": ["x"], "completion": "e"}]')
    records, rejects, _ = load_source(Source(path="rows.json"), tmp_path)
    assert [r["index"] for r in records] == [0]
    assert [(r["index"], r["reason"].split(":")[0]) for r in rejects] == [(1, "wrong schema"), (2, "not UTF-8"),
                                                                          (3, "wrong schema")]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]),
                   tmp_path / "t.parquet")
    records, rejects, _ = load_source(Source(path="t.parquet"), tmp_path)
    assert len(records) == 1 and rejects[0]["index"] == 1 and "completion" in rejects[0]["reason"]
    (tmp_path / "broken.json").write_text('[{"prompt": "a", "completion": "b"},\n oops]')
    with pytest.raises(DataError, match=r"broken.json:2: invalid JSON"):  # an array cannot be read row by row
        load_source(Source(path="broken.json"), tmp_path)
