"""Raw rows out of data files, one `(index, row)` at a time; a bad row never stops the read.

A row that cannot be read (invalid JSON, bytes that are not UTF-8, too large, more CSV cells than
columns) comes out as a `Bad` with its reason, in its place, so the load stage can reject it with its
file and line. Only a file that cannot be split into rows at all (a broken JSON array, a broken
Parquet file) raises `DataError`. JSONL is read as bytes and decoded line by line, so one undecodable
line costs that line only; no more than `max_bytes` of a line is ever held in memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sftflow.errors import UserError

DEFAULT_MAX_BYTES = 4_000_000
_BOM = b"\xef\xbb\xbf"
_EXCERPT = 300  # characters of a bad line kept for the rejects file


class DataError(UserError, ValueError):
    """Input that cannot be read at all (missing files, a broken JSON array); names the file and line."""


@dataclass(frozen=True)
class Bad:
    """A row that could not be read; `reason` is `kind: detail`, `excerpt` the start of the raw text."""

    reason: str
    excerpt: str = ""


Rows = Iterator[tuple[int, object]]


def _oversize(size: int, max_bytes: int) -> Bad:
    return Bad(f"oversize: {size} bytes, more than curate.max_record_bytes {max_bytes}")


def _sized(index: int, row: object, max_bytes: int) -> tuple[int, object]:
    """An in-memory row, or a Bad when its JSON text would pass the size limit."""
    try:
        size = len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
    except (RecursionError, ValueError):
        return index, Bad("wrong schema: nested too deeply to read")
    return index, (_oversize(size, max_bytes) if size > max_bytes else row)


def parse_line(line: bytes) -> object:
    """One JSONL line -> its JSON value, or a Bad saying why not."""
    excerpt = line[:_EXCERPT].decode("utf-8", "replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Bad(f"not UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}", excerpt)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return Bad(f"invalid JSON: {exc.msg} (column {exc.colno})", excerpt)
    except (RecursionError, ValueError) as exc:  # nesting past the stack, integers past the digit limit
        return Bad(f"invalid JSON: {'nested too deeply' if isinstance(exc, RecursionError) else exc}", excerpt)


def _skip_rest_of_line(fh, size: int) -> int:
    while chunk := fh.readline(1 << 20):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            return size - 1
    return size


def read_jsonl(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    """(1-based line, value or Bad) for every non-blank line."""
    with path.open("rb") as fh:
        lineno = 0
        while line := fh.readline(max_bytes + 2):
            lineno += 1
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            ended = line.endswith(b"\n")
            line = line.rstrip(b"\r\n") if ended else line
            if len(line) > max_bytes:
                size = len(line) if ended else _skip_rest_of_line(fh, len(line))
                yield lineno, _oversize(size, max_bytes)
                continue
            if not line.decode("utf-8", "replace").strip():
                continue  # blank lines are layout, not records
            yield lineno, parse_line(line)


def _superni_rows(task: dict, max_bytes: int) -> Rows:
    definition = task["Definition"][0] if isinstance(task["Definition"], list) and task["Definition"] \
        else task["Definition"]
    instances = task["Instances"] if isinstance(task["Instances"], list) else []
    for i, inst in enumerate(instances):
        if not isinstance(definition, str):
            yield i, Bad("wrong schema: the task's Definition is not text")
        elif not isinstance(inst, dict):
            yield i, Bad("wrong schema: instance is not a JSON object", str(inst)[:_EXCERPT])
        else:
            yield _sized(i, {"definition": definition, "input": inst.get("input"), "output": inst.get("output"),
                             "native_id": inst.get("id")}, max_bytes)


def read_json(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    """(0-based item, value or Bad) of a JSON list or a Super-NaturalInstructions task file.

    Undecodable bytes become lone surrogates, so only the rows holding them are rejected (as not UTF-8)."""
    text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}; a JSON array cannot be read row by row, "
                        "fix the file or convert it to JSONL") from None
    except (RecursionError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    if isinstance(obj, dict) and "Instances" in obj and "Definition" in obj:
        yield from _superni_rows(obj, max_bytes)
    elif isinstance(obj, list):
        for i, row in enumerate(obj):
            yield _sized(i, row, max_bytes)
    else:
        raise DataError(f"{path}: expected a JSON list of records or a Super-NaturalInstructions task file")


def read_csv(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    """(line a row starts on, row or Bad); line 1 is the header."""
    csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        start = 2
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row = Bad(f"wrong schema: unreadable CSV row: {exc}")
            if isinstance(row, dict) and None in row:
                row = Bad("wrong schema: more cells than header columns")
            yield (start, row) if isinstance(row, Bad) else _sized(start, row, max_bytes)
            start = reader.line_num + 1


def read_parquet(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    for i, row in enumerate(table.to_pylist()):
        yield _sized(i, row, max_bytes)


READERS: dict[str, Callable[[Path, int], Rows]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_rows(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Rows:
    """(index, raw row or Bad): JSONL and CSV give the 1-based line, JSON and Parquet the 0-based item."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(READERS)})")
    yield from reader(path, max_bytes)
