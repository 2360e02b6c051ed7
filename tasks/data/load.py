"""Stage 1: read every configured source and normalise it into canonical records.

Formats are a small registry: each knows how to recognise a raw row and turn it into messages. Every
row is kept or rejected with its file, line and a `kind: detail` reason (invalid JSON, not UTF-8,
oversize, wrong schema, unknown role); `curate.on_bad_record: fail` stops at the first instead.
Tool calls, tool results and reasoning are read by shapes.py.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sftflow import cache
from sftflow.cache import cached
from sftflow.configs.schema import CurateConfig, DataConfig, Source
from sftflow.records import record_id, reject, write_jsonl
from sftflow.results import Loaded
from sftflow.tasks.data import gsm8k, shapes
from sftflow.tasks.data.readers import DEFAULT_MAX_BYTES, Bad, DataError, read_rows
from sftflow.tracking import stage

__all__ = ["DataError", "FORMATS", "load", "load_source", "normalise", "source_files"]


class BadRow(ValueError):
    """A row that reads but is no record; the message is the reject reason (`kind: detail`)."""


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict], bool]
    convert: Callable[[dict], tuple[list[dict], object]]  # -> (messages, label)
    tools: tuple[dict, ...] = ()  # function schemas every record of the format offers


def _text(value: object, what: str) -> str:
    try:
        return shapes.text(value, what)
    except shapes.ShapeError as exc:
        raise BadRow(str(exc)) from None


def _listed(value: object, key: str) -> list:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise BadRow(f"wrong schema: '{key}' holds text that is not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise BadRow(f"wrong schema: '{key}' must be a non-empty list")
    return value


def _messages(row: dict) -> tuple[list[dict], object]:
    msgs = _listed(row["messages"], "messages")
    turns = [m if isinstance(m, dict) else {} for m in msgs]
    return [shapes.turn(m.get("role"), m.get("content"), f"messages[{i}]", m) for i, m in enumerate(turns)], \
        row.get("label")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def _sharegpt(row: dict) -> tuple[list[dict], object]:
    turns = shapes.sharegpt_turns(_listed(row["conversations"], "conversations"), SHAREGPT_ROLES)
    if isinstance(row.get("system"), str) and row["system"].strip() and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": row["system"]})  # LLaMA-Factory's system column
    return turns, row.get("label")


def _instruction(instruction: object, context: object, answer: object) -> list[dict]:
    instruction, answer = _text(instruction, "instruction"), _text(answer, "the answer")
    context = context if isinstance(context, str) else ""
    user = f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _alpaca(row: dict) -> tuple[list[dict], object]:
    return _instruction(row["instruction"], row.get("input"), row["output"]), row.get("label")


def _dolly(row: dict) -> tuple[list[dict], object]:
    return _instruction(row["instruction"], row.get("context"), row["response"]), row.get("label")


def _prompt_completion(row: dict) -> tuple[list[dict], object]:
    prompt, completion = _text(row["prompt"], "'prompt'"), _text(row["completion"], "'completion'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], row.get("label")


def _superni(row: dict) -> tuple[list[dict], object]:
    # Rows are pre-joined with their task's definition by the JSON reader.
    outputs = row["output"]
    answer = _text(outputs[0] if isinstance(outputs, list) and outputs else outputs, "output[0]")
    user = f"{_text(row['definition'], 'definition').strip()}\n\n{_text(row['input'], 'input').strip()}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], answer


# Auto-detection tries these in order: the first whose keys fit wins.
FORMATS: dict[str, Format] = {
    "messages": Format(lambda r: "messages" in r, _messages),
    "sharegpt": Format(lambda r: "conversations" in r, _sharegpt),
    "superni": Format(lambda r: "definition" in r and "output" in r and "input" in r, _superni),
    "dolly": Format(lambda r: "instruction" in r and "response" in r, _dolly),
    "alpaca": Format(lambda r: "instruction" in r and "output" in r, _alpaca),
    "prompt_completion": Format(lambda r: "prompt" in r and "completion" in r, _prompt_completion),
    # GSM8K's worked answers, their <<calculations>> as calculator calls.
    "gsm8k_calculator": Format(lambda r: "question" in r and "<<" in str(r.get("answer", "")),
                               gsm8k.calculator_conversation, (gsm8k.CALCULATOR,)),
}
# Row fields kept in meta (used by the split for stratification and grouping).
META_FIELDS = ("category", "native_id", "conversation_id", "group")
_SCALAR = (str, int, float, bool)


def _encodable(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"not UTF-8: {what} holds undecodable bytes or a lone surrogate") from None
    return text


def normalise(row: object, fmt_name: str = "auto") -> tuple[list[dict], str | None, dict]:
    """A raw row -> (messages, label, meta); raises BadRow with the reason it is no record."""
    if isinstance(row, Bad):
        raise BadRow(row.reason)
    if not isinstance(row, dict):
        raise BadRow(f"wrong schema: row is a JSON {type(row).__name__}, not an object")
    if fmt_name == "auto":
        fmt_name = next((n for n, f in FORMATS.items() if f.detect(row)), "")
        if not fmt_name:
            raise BadRow(f"wrong schema: no known format fits keys {sorted(row)[:20]} (known: {', '.join(FORMATS)})")
    try:
        messages, label = FORMATS[fmt_name].convert(row)
    except KeyError as exc:
        raise BadRow(f"wrong schema: missing field {exc} for format {fmt_name}") from None
    except shapes.ShapeError as exc:
        raise BadRow(str(exc)) from None
    if label is not None and not isinstance(label, _SCALAR):
        raise BadRow(f"wrong schema: label must be text or a number, not {type(label).__name__}")
    for m in messages:
        _encodable(m["content"], f"{m['role']} turn")
        _encodable(m.get("reasoning_content", ""), f"{m['role']} reasoning")
    label = None if label is None else _encodable(str(label), "label")
    meta = {"format": fmt_name}
    for k in META_FIELDS:
        if row.get(k) not in (None, ""):
            if not isinstance(row[k], _SCALAR):
                raise BadRow(f"wrong schema: '{k}' must be text or a number, not {type(row[k]).__name__}")
            meta[k] = row[k]
    return messages, label, meta


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


def _where(file: str, idx: int) -> str:
    return f"{file}:{idx}"


def _raw_excerpt(row: object) -> str:
    """What a reject row shows of its input: the start of its JSON text (bounded, always writable)."""
    if isinstance(row, Bad):
        return row.excerpt
    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return "<nested too deeply to show>"
    return text if len(text) <= 2000 else text[:2000] + "..."


def load_source(source: Source, root: Path, seed: int = 0, on_bad_record: str = "reject",
                max_record_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[dict], list[dict], int]:
    """-> (records, rejects, rows available before subsampling); `on_bad_record: fail` raises at the first."""
    if source.hub:
        name = source.name or source.hub
        streams = [(source.hub, _hub_rows(source))]
    else:
        files = source_files(source, root)
        name = source.name or (files[0].stem if len(files) == 1 else Path(source.path).stem)
        streams = [(_relative(f, root), read_rows(f, max_record_bytes)) for f in files]

    raw = []
    for file, rows in streams:
        for idx, row in rows:
            if on_bad_record == "fail" and isinstance(row, Bad):  # stop reading here, not after the file
                raise DataError(f"{_where(file, idx)}: {row.reason} (curate.on_bad_record: fail)")
            raw.append((file, idx, row))
    available = len(raw)
    keep = min(source.max_records or available, round(available * (source.weight or 1.0)))
    if keep < available:
        rng = random.Random(f"{seed}:{name}:{keep}")
        raw = sorted(rng.sample(raw, keep), key=lambda t: (t[0], t[1]))

    records, rejects = [], []
    for file, idx, row in raw:
        base = {"id": record_id(name, file, idx), "source": name, "file": file, "index": idx}
        try:
            messages, label, meta = normalise(row, source.format)
            # the function schemas offered to the assistant: the row's own, else its format's
            tools = shapes.tools(row.get("tools")) or list(FORMATS[meta["format"]].tools)
        except (BadRow, shapes.ShapeError) as exc:
            if on_bad_record == "fail":
                raise DataError(f"{_where(file, idx)}: {exc} (curate.on_bad_record: fail)") from None
            rejects.append(reject({**base, "raw": _raw_excerpt(row)}, "load", str(exc)))
            continue
        tools_field = {"tools": tools} if tools else {}  # absent, not empty: plain records keep their shape
        records.append({**base, "messages": messages, "label": label, "meta": meta, **tools_field})
    if not records:
        first = f"{_where(rejects[0]['file'], rejects[0]['index'])}: {rejects[0]['reason']}" if rejects else "no rows"
        raise DataError(f"source {name!r} yielded no usable record ({len(rejects)} rejected; first {first})")
    return records, rejects, available


@stage("load")
def load(cfg: DataConfig, out_dir: Path, policy: CurateConfig | None = None) -> Loaded:
    """Load every source; write records.jsonl and load_rejects.jsonl; return paths and counts.

    `policy` gives curate.on_bad_record and curate.max_record_bytes (defaults: reject, 4 MB).
    Cached by the config and the content of every matched file (hub sources by id and split)."""
    policy = policy or CurateConfig()
    bad = {"on_bad_record": policy.on_bad_record, "max_record_bytes": policy.max_record_bytes}
    root = Path(cfg.root)
    inputs = [s.hub or [(_relative(f, root), f) for f in source_files(s, root)] for s in cfg.sources]
    return cached("load", cache.key("load-v3", cfg.model_dump(exclude={"root"}), bad, inputs), out_dir,
                  lambda d: _load(cfg, d, bad))


def _load(cfg: DataConfig, out_dir: Path, bad: dict) -> dict:
    root = Path(cfg.root)
    records, rejects, per_source = [], [], {}
    for source in cfg.sources:
        recs, rejs, available = load_source(source, root, cfg.seed, **bad)
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
    by_reason = reason_counts(rejects)
    return {"records": str(out_dir / "records.jsonl"), "rejects": str(out_dir / "load_rejects.jsonl"),
            "metrics": {"load/records": len(records), "load/rejected": len(rejects),
                        "load/sources": len(per_source),
                        **{f"load/rejected/{k.replace(' ', '_')}": v for k, v in by_reason.items()}},
            "ledger": {"rows": len(records) + len(rejects), "rejected": len(rejects), "per_source": per_source,
                       "by_reason": by_reason},
            "artifacts": [out_dir / "sources.json", out_dir / "load_rejects.jsonl"]}


def reason_counts(rejects: list[dict]) -> dict[str, int]:
    """Rejects counted by the kind of their reason (the text before the first colon)."""
    out: dict[str, int] = {}
    for r in rejects:
        kind = r["reason"].split(":", 1)[0]
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))
