"""Property tests of the readers and the normaliser: any input bytes, any JSON values.

Every non-blank line (every row) becomes a canonical record or a reject with a known reason; nothing
raises, nothing is dropped, and what comes out can be written and read back.
"""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sftflow.configs.schema import Source
from sftflow.records import ROLES, read_jsonl, write_jsonl
from sftflow.tasks.data.load import FORMATS, BadRow, load_source, normalise
from sftflow.tasks.data.readers import Bad, DataError, read_rows

KINDS = {"invalid JSON", "not UTF-8", "oversize", "wrong schema", "unknown role"}
GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that includes the awkward cases: lone surrogates (escaped in JSON), NUL, blank turns.
texts = st.text(max_size=20) | st.lists(st.sampled_from(["a", "b ", "\ud800", "\udcff", "é", "\n", "\x00", " "]),
                                        max_size=6).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)
turn = st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "wizard"]) | json_values,
                              "content": texts | json_values},
                             optional={"from": st.sampled_from(["human", "gpt", "system", "bard", "x"]) | json_values,
                                       "value": texts | json_values})
fields = texts | json_values | st.lists(turn, max_size=4) | st.lists(turn, max_size=3).map(json.dumps)
extras = {k: json_values | texts for k in ("label", "category", "group", "native_id")}
# One shape per format: its detection keys with any values, so each converter meets bad input.
shaped = st.one_of(*(st.fixed_dictionaries({k: fields for k in keys}, optional=extras) for keys in (
    ("messages",), ("conversations",), ("definition", "input", "output"), ("instruction", "response", "context"),
    ("instruction", "input", "output"), ("prompt", "completion"))))
near_records = shaped | st.dictionaries(texts, fields, max_size=4)


def non_blank_lines(data: bytes) -> int:
    lines = data.split(b"\n")
    if lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for line in lines if line.decode("utf-8", "replace").strip())


def assert_accounted(records: list[dict], rejects: list[dict], rows: int, folder: Path) -> None:
    assert len(records) + len(rejects) == rows
    assert len({r["index"] for r in records} | {r["index"] for r in rejects}) == rows  # each row once
    for r in records:
        assert r["messages"] and all(m["role"] in ROLES and isinstance(m["content"], str) for m in r["messages"])
        assert r["label"] is None or isinstance(r["label"], str)
        for m in r["messages"]:
            m["content"].encode("utf-8")  # valid Unicode: a tokenizer can take it
    for r in rejects:
        assert r["reason"].split(":", 1)[0] in KINDS and r["file"] and isinstance(r["index"], int)
    # both files can be written and read back unchanged (lone surrogates included)
    assert write_jsonl(folder / "r.jsonl", records + rejects) == rows
    assert [x["id"] for x in read_jsonl(folder / "r.jsonl")] == [x["id"] for x in records + rejects]


def load_bytes(data: bytes, name: str = "in.jsonl") -> tuple[list[dict], list[dict], Path]:
    folder = Path(tempfile.mkdtemp())
    (folder / name).write_bytes(data)
    records, rejects, _ = load_source(Source(path=name), folder, max_record_bytes=200_000)
    return records, rejects, folder


@SETTINGS
@given(st.binary(max_size=3000))
@example(b"[" * 150_000)  # deeper than the parser's stack
@example(b"9" * 5000)  # more digits than Python converts
@example(b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n \t\n\xff\n\x00")  # BOM, CRLF, blank, not UTF-8, NUL
def test_any_bytes_as_jsonl_give_records_or_rejects_for_every_line(data):
    data = data + b"\n" + GOOD  # one good line, so the source is never empty
    records, rejects, folder = load_bytes(data)
    assert_accounted(records, rejects, non_blank_lines(data), folder)
    assert records[-1]["messages"][-1]["content"] == "a"


@SETTINGS
@given(st.lists(json_values | near_records, max_size=12), st.sampled_from(["auto", *FORMATS]))
def test_any_json_value_per_line_is_a_canonical_record_or_a_reject(values, fmt):
    lines = [json.dumps(v).encode() for v in values]
    data = b"\n".join([*lines, GOOD])
    folder = Path(tempfile.mkdtemp())
    (folder / "in.jsonl").write_bytes(data)
    try:
        records, rejects, _ = load_source(Source(path="in.jsonl", format=fmt), folder)
    except DataError as exc:  # a declared format that no row fits: the source as a whole is refused
        assert "yielded no usable record" in str(exc) and fmt != "auto"
        return
    assert_accounted(records, rejects, non_blank_lines(data), folder)


@SETTINGS
@given(st.lists(json_values | near_records, max_size=8))
def test_normalise_returns_a_record_or_raises_only_badrow(values):
    for v in values:
        try:
            messages, label, meta = normalise(v)
        except BadRow as exc:
            assert str(exc).split(":", 1)[0] in KINDS
            continue
        assert all(m["role"] in ROLES for m in messages) and (label is None or isinstance(label, str))
        assert meta["format"] in FORMATS


@SETTINGS
@given(st.binary(max_size=1500), st.sampled_from([".csv", ".json"]))
def test_any_bytes_as_csv_or_json_never_raise_anything_but_a_file_level_dataerror(data, suffix):
    folder = Path(tempfile.mkdtemp())
    path = folder / f"in{suffix}"
    path.write_bytes(data)
    try:
        rows = list(read_rows(path, 2000))
    except DataError as exc:  # only a JSON file that is not one JSON value can fail as a whole
        assert suffix == ".json" and str(path) in str(exc)
        return
    for index, row in rows:
        assert isinstance(index, int) and isinstance(row, (dict, Bad, list, str, int, float, bool, type(None)))
        try:
            normalise(row)
        except BadRow:
            pass
