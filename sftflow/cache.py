"""Content-addressed cache for stage outputs.

A key is the sha256 of everything a stage's output depends on: the *contents* of its input files (never
their paths or mtimes), its config section, and library versions. An entry is a folder under
`<state>/cache/<stage>/<key>/`; it becomes visible only when complete (written to a temp folder, then
renamed), so a killed run never leaves a half entry that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from sftflow import env

_DONE = ".complete"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's sorted relative paths and file bytes."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _canonical(part):
    if isinstance(part, Path):
        return {"file": file_digest(part)}
    if isinstance(part, BaseModel):
        return part.model_dump(mode="json")
    if isinstance(part, dict):
        return {str(k): _canonical(v) for k, v in sorted(part.items())}
    if isinstance(part, (list, tuple)):
        return [_canonical(p) for p in part]
    return part


def key(*parts) -> str:
    """Cache key of JSON-able parts; `Path` parts count by content, pydantic models by their values."""
    blob = json.dumps([_canonical(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry(stage: str, cache_key: str) -> Path:
    return env.state_dir() / "cache" / stage / cache_key


def lookup(stage: str, cache_key: str) -> Path | None:
    """The folder of a complete entry, or None."""
    path = entry(stage, cache_key)
    return path if (path / _DONE).exists() else None


@contextlib.contextmanager
def fill(stage: str, cache_key: str) -> Iterator[Path]:
    """Yield a temp folder to write the entry into; publish it atomically when the block succeeds."""
    final = entry(stage, cache_key)
    tmp = final.with_name(f".tmp-{cache_key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / _DONE).write_text("")
        if (final / _DONE).exists():  # a concurrent run got there first; its entry is equivalent
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
