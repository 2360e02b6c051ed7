"""Stage 1: read every configured source and normalise it into canonical records.

Formats are a small registry: each knows how to recognise a raw row and turn it into messages.
A raw row that fits no format is rejected with its file and line, never dropped silently.
"""

from __future__ import annotations

import csv
import glob
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sftflow import cache
from sftflow.configs.schema import DataConfig, Source
from sftflow.errors import UserError
from sftflow.records import ROLES, record_id, reject, write_jsonl
from sftflow.tasks.stagecache import cached
from sftflow.tracking import stage_task


class DataError(UserError, ValueError):
    """Input that cannot be read at all (missing files, broken JSON); names the file and line."""


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict], bool]
    convert: Callable[[dict], tuple[list[dict], str | None]]  # -> (messages, label)


def _turn(role: object, content: object, where: str) -> dict:
    if role not in ROLES or not isinstance(content, str):
        raise ValueError(f"{where} needs role in {ROLES} and string content (got role {role!r})")
    return {"role": role, "content": content}


def _listed(value: object, key: str) -> list:
    if isinstance(value, str):  # CSV cells hold JSON text
        value = json.loads(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list")
    return value


def _messages(row: dict) -> tuple[list[dict], str | None]:
    msgs = _listed(row["messages"], "messages")
    turns = [m if isinstance(m, dict) else {} for m in msgs]
    return [_turn(m.get("role"), m.get("content"), f"messages[{i}]") for i, m in enumerate(turns)], row.get("label")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def _sharegpt(row: dict) -> tuple[list[dict], str | None]:
    turns = _listed(row["conversations"], "conversations")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"conversations[{i}] is not an object")
        out.append(_turn(SHAREGPT_ROLES.get(str(t.get("from", "")).lower()), t.get("value"), f"conversations[{i}]"))
    return out, row.get("label")


def _instruction(instruction: object, context: object, answer: object) -> list[dict]:
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError("instruction and answer must be strings")
    context = context if isinstance(context, str) else ""
    user = f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _alpaca(row: dict) -> tuple[list[dict], str | None]:
    return _instruction(row["instruction"], row.get("input"), row["output"]), row.get("label")


def _dolly(row: dict) -> tuple[list[dict], str | None]:
    return _instruction(row["instruction"], row.get("context"), row["response"]), row.get("label")


def _prompt_completion(row: dict) -> tuple[list[dict], str | None]:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must be strings")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], row.get("label")


def _superni(row: dict) -> tuple[list[dict], str | None]:
    # Rows are pre-joined with their task's definition by _read_superni.
    answer = row["output"][0]
    user = f"{row['definition'].strip()}\n\n{row['input'].strip()}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], answer


# Auto-detection tries these in order: the first whose keys fit wins.
FORMATS: dict[str, Format] = {
    "messages": Format(lambda r: "messages" in r, _messages),
    "sharegpt": Format(lambda r: "conversations" in r, _sharegpt),
    "superni": Format(lambda r: "definition" in r and "output" in r and "input" in r, _superni),
    "dolly": Format(lambda r: "instruction" in r and "response" in r, _dolly),
    "alpaca": Format(lambda r: "instruction" in r and "output" in r, _alpaca),
    "prompt_completion": Format(lambda r: "prompt" in r and "completion" in r, _prompt_completion),
}
# Row fields kept in meta (used by the split for stratification and grouping).
META_FIELDS = ("category", "native_id", "conversation_id", "group")


def _is_superni_task(obj: object) -> bool:
    return isinstance(obj, dict) and "Instances" in obj and "Definition" in obj


def _read_superni(task: dict) -> Iterator[tuple[int, dict]]:
    definition = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
    for i, inst in enumerate(task["Instances"]):
        yield i, {"definition": definition, "input": inst.get("input"), "output": inst.get("output"),
                  "native_id": inst.get("id")}


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if _is_superni_task(obj):
        yield from _read_superni(obj)
    elif isinstance(obj, list):
        yield from enumerate(obj)
    else:
        raise DataError(f"{path}: expected a JSON list of records or a Super-NaturalInstructions task file")


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        start = 2  # the line a row starts on (1-based; line 1 is the header)
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{start}: more cells than header columns")
            yield start, row
            start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    yield from enumerate(table.to_pylist())


READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict]]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(index, raw row): JSONL and CSV give the 1-based line, JSON and Parquet the 0-based item."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(READERS)})")
    yield from reader(path)


def source_files(source: Source, root: Path) -> list[Path]:
    pattern = Path(source.path).expanduser()
    pattern = pattern if pattern.is_absolute() else root / pattern
    files = sorted(Path(p) for p in glob.glob(str(pattern)))
    if files:
        return files
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist. sftflow's offline demo reads the shared data folder "
            "(MMLU, BBH, Super-NaturalInstructions; see its SOURCES.md) placed beside the repository as "
            "../shared/data. Point the config at it with `data.root: PATH` or `--set data.root=PATH`, "
            "or use `hub:` sources when online."
        )
    raise DataError(f"source {source.path!r}: no file matches {pattern}")


def _hub_rows(source: Source) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hub, split=source.split)
    except Exception as exc:  # offline mode, unknown id, ...: say which source failed and why
        raise DataError(f"hub source {source.hub!r} (split {source.split!r}) could not be loaded: {exc}") from exc
    yield from enumerate(ds)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def _convert(row: object, fmt_name: str) -> tuple[list[dict], str | None, str]:
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    if fmt_name == "auto":
        fmt_name = next((n for n, f in FORMATS.items() if f.detect(row)), "")
        if not fmt_name:
            raise ValueError(f"no known format fits keys {sorted(row)} (known: {', '.join(FORMATS)})")
    messages, label = FORMATS[fmt_name].convert(row)
    return messages, (None if label is None else str(label)), fmt_name


def load_source(source: Source, root: Path, seed: int = 0) -> tuple[list[dict], list[dict], int]:
    """-> (records, rejects, rows available before subsampling)."""
    if source.hub:
        name = source.name or source.hub
        streams = [(source.hub, _hub_rows(source))]
    else:
        files = source_files(source, root)
        name = source.name or (files[0].stem if len(files) == 1 else Path(source.path).stem)
        streams = [(_relative(f, root), read_rows(f)) for f in files]

    raw = [(file, idx, row) for file, rows in streams for idx, row in rows]
    available = len(raw)
    keep = min(source.max_records or available, round(available * (source.weight or 1.0)))
    if keep < available:
        rng = random.Random(f"{seed}:{name}:{keep}")
        raw = sorted(rng.sample(raw, keep), key=lambda t: (t[0], t[1]))

    records, rejects = [], []
    for file, idx, row in raw:
        base = {"id": record_id(name, file, idx), "source": name, "file": file, "index": idx}
        try:
            messages, label, fmt = _convert(row, source.format)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            rejects.append(reject({**base, "raw": row}, "load", f"malformed: {exc}"))
            continue
        meta = {"format": fmt, **{k: row[k] for k in META_FIELDS if row.get(k) not in (None, "")}}
        records.append({**base, "messages": messages, "label": label, "meta": meta})
    if not records:
        first = rejects[0]["reason"] if rejects else "no rows"
        raise DataError(f"source {name!r} yielded no usable record ({first})")
    return records, rejects, available


def load(cfg: DataConfig, out_dir: Path) -> dict:
    """Load every source; write records.jsonl and load_rejects.jsonl; return paths and counts.

    Cached by the config and the content of every matched file (hub sources by id and split)."""
    root = Path(cfg.root)
    inputs = [s.hub or [(_relative(f, root), f) for f in source_files(s, root)] for s in cfg.sources]
    return cached("load", cache.key("load-v1", cfg.model_dump(exclude={"root"}), inputs), out_dir,
                  lambda d: _load(cfg, d))


def _load(cfg: DataConfig, out_dir: Path) -> dict:
    root = Path(cfg.root)
    records, rejects, per_source = [], [], {}
    for source in cfg.sources:
        recs, rejs, available = load_source(source, root, cfg.seed)
        name = recs[0]["source"]
        per_source[name] = {"available": available, "loaded": len(recs), "rejected": len(rejs)}
        records += recs
        rejects += rejs
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise DataError("two sources produced the same record ids: give them distinct `name`s")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "records.jsonl", records)
    write_jsonl(out_dir / "load_rejects.jsonl", rejects)
    (out_dir / "sources.json").write_text(json.dumps(per_source, indent=2))
    return {"records": str(out_dir / "records.jsonl"), "rejects": str(out_dir / "load_rejects.jsonl"),
            "metrics": {"load/records": len(records), "load/rejected": len(rejects),
                        "load/sources": len(per_source)},
            "ledger": {"rows": len(records) + len(rejects), "rejected": len(rejects), "per_source": per_source},
            "artifacts": [out_dir / "sources.json", out_dir / "load_rejects.jsonl"]}


load_task = stage_task(load, "load")
