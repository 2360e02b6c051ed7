"""Stage 1: read every configured source and normalise it into canonical records.

Formats are a small registry: each knows how to recognise a raw row and turn it into messages.
A raw row that fits no format is rejected with its file and line, never dropped silently.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sftflow.tracking import stage_task

from sftflow.configs.schema import DataConfig, Source
from sftflow.records import ROLES, record_id, reject, write_jsonl


class DataError(ValueError):
    """Input that cannot be read at all (missing files, broken JSON); names the file and line."""


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict], bool]
    convert: Callable[[dict], tuple[list[dict], str | None]]  # -> (messages, label)


def _messages(row: dict) -> tuple[list[dict], str | None]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] needs role in {ROLES} and string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out, row.get("label")


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


FORMATS: dict[str, Format] = {
    "messages": Format(lambda r: "messages" in r, _messages),
    "prompt_completion": Format(lambda r: "prompt" in r and "completion" in r, _prompt_completion),
    "superni": Format(lambda r: "definition" in r and "output" in r and "input" in r, _superni),
}


def _is_superni_task(obj: object) -> bool:
    return isinstance(obj, dict) and "Instances" in obj and "Definition" in obj


def _read_superni(task: dict) -> Iterator[tuple[int, dict]]:
    definition = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
    for i, inst in enumerate(task["Instances"]):
        yield i, {"definition": definition, "input": inst.get("input"), "output": inst.get("output"),
                  "native_id": inst.get("id")}


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(index, raw row) for JSONL (1-based line) and JSON (0-based item) files."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    elif path.suffix == ".json":
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
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl or .json)")


def _files(source: Source, root: Path) -> list[Path]:
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
        files = _files(source, root)
        name = source.name or (files[0].stem if len(files) == 1 else Path(source.path).stem)
        streams = [(_relative(f, root), read_rows(f)) for f in files]

    raw = [(file, idx, row) for file, rows in streams for idx, row in rows]
    available = len(raw)
    if source.max_records and available > source.max_records:
        rng = random.Random(f"{seed}:{name}:{source.max_records}")
        raw = sorted(rng.sample(raw, source.max_records), key=lambda t: (t[0], t[1]))

    records, rejects = [], []
    for file, idx, row in raw:
        base = {"id": record_id(name, file, idx), "source": name, "file": file, "index": idx}
        try:
            messages, label, fmt = _convert(row, source.format)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            rejects.append(reject({**base, "raw": row}, "load", f"malformed: {exc}"))
            continue
        meta = {"format": fmt}
        if isinstance(row, dict) and row.get("native_id"):
            meta["native_id"] = row["native_id"]
        records.append({**base, "messages": messages, "label": label, "meta": meta})
    if not records:
        first = rejects[0]["reason"] if rejects else "no rows"
        raise DataError(f"source {name!r} yielded no usable record ({first})")
    return records, rejects, available


def load(cfg: DataConfig, out_dir: Path) -> dict:
    """Load every source; write records.jsonl and load_rejects.jsonl; return paths and counts."""
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
            "per_source": per_source, "artifacts": [out_dir / "sources.json", out_dir / "load_rejects.jsonl"]}


load_task = stage_task(load, "load")
