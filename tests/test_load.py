import json

import pytest

from sftflow.configs.schema import DataConfig, Source
from sftflow.records import read_jsonl
from sftflow.tasks.load import DataError, load, load_source


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
        load_source(Source(path="bad.jsonl"), tmp_path)


def test_missing_data_root_explains_how_to_point_at_it(tmp_path):
    with pytest.raises(DataError, match=r"data.root"):
        load_source(Source(path="natural-instructions/tasks/*.json"), tmp_path / "nowhere")


def test_duplicate_source_names_are_refused(tmp_path):
    write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    cfg = DataConfig(root=str(tmp_path), sources=[Source(path="a.jsonl", name="x"), Source(path="a.jsonl", name="x")])
    with pytest.raises(DataError, match="distinct"):
        load(cfg, tmp_path / "out")
