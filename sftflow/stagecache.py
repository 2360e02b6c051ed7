"""Stage outputs through the content-addressed cache: an unchanged re-run copies the entry, does no work."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from sftflow import cache
from sftflow import metrics as names

_OUT = "@OUT_DIR@"  # result.json stores paths relative to the stage folder under this marker


def _copy_tree(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in (cache.MANIFEST, "result.json"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def _marker(folder: Path) -> str:
    return json.dumps(str(folder))[1:-1]  # the folder as it appears inside JSON text


def save_result(entry: Path, result: dict, folder: Path) -> None:
    """The stage's result into entry/result.json, its paths under `folder` stored relative to it."""
    (entry / "result.json").write_text(json.dumps(result, default=str).replace(_marker(folder), _OUT))


def load_result(entry: Path, folder: Path) -> dict:
    """A stored result with its relative paths placed under `folder`, where the entry was copied to."""
    return json.loads((entry / "result.json").read_text().replace(_OUT, _marker(folder)))


def cached(stage: str, key: str, out_dir: Path, compute: Callable[[Path], dict]) -> dict:
    """`compute(out_dir)` unless the cache holds `key`; the result says `<stage>/cache_hit` 1 or 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hit = cache.lookup(stage, key)
    if hit is not None:
        _copy_tree(hit, out_dir)
        result = load_result(hit, out_dir)
    else:
        result = compute(out_dir)
        with cache.fill(stage, key) as entry:
            _copy_tree(out_dir, entry)
            save_result(entry, result, out_dir)
    result.setdefault("metrics", {})[names.stage_cache_hit(stage)] = int(hit is not None)
    result["cache_key"] = key
    return result
