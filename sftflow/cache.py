"""Content-addressed cache for stage outputs.

A key is the sha256 of everything a stage's output depends on: the *contents* of its input files (never
their paths or mtimes), its config section, and library versions. An entry is a folder under
`<state>/cache/<stage>/<key>/`, published atomically: written to a temp folder, its files fsynced, a
manifest of every file's size and sha256 written last, then renamed into place. Each read checks the
manifest (sizes and hashes): a killed run, a full disk or a damaged file never leaves an entry a later
run would trust; a damaged entry is discarded (logged) and counts as a miss, so the stage recomputes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel

from sftflow import env
from sftflow import metrics as names

MANIFEST = ".entry.json"  # written last: an entry without it is incomplete (or a training still in progress)
log = logging.getLogger("sftflow.cache")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def problem(folder: Path) -> str | None:
    """Why a published entry cannot be trusted (a file missing, truncated or changed), or None."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for rel, want in files.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want["size"]:  # the cheap check first: a truncated file costs no hashing
            return f"{rel} has {size} bytes, {want['size']} were published"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its published sha256"
    return None


def _discard(folder: Path, why: str, level: int = logging.WARNING) -> None:
    """Move a damaged entry out of the way in one rename (readers see it or nothing), then delete it."""
    log.log(level, "cache: discarding %s: %s", folder, why)
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def lookup(stage: str, cache_key: str) -> Path | None:
    """The folder of a complete, intact entry, or None (a damaged one is discarded)."""
    path = entry(stage, cache_key)
    if not (path / MANIFEST).exists():
        return None  # absent, or a training's work folder (tasks/training/run.py): never deleted here
    if (why := problem(path)) is None:
        return path
    _discard(path, why)
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path) -> None:
    """fsync every file, then write the manifest (sizes + sha256) last and fsync it and the folders."""
    files = {}
    for f in _files(folder):
        _fsync(f)
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / MANIFEST)
    for d in {folder, *(p for p in folder.rglob("*") if p.is_dir())}:
        _fsync(d)


def publish(tmp: Path, final: Path) -> None:
    """Rename a sealed temp folder into place. Two writers of one key: the first rename wins, the loser's
    copy is dropped; an existing folder that is not an intact entry (a stale work folder) is replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, final)  # atomic; fails when final is a non-empty folder
            _fsync(final.parent)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not (final / MANIFEST).exists():  # a training's work folder, or a legacy entry
            _discard(final, "replaced by the new entry", logging.INFO)
        elif (why := problem(final)) is None:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer published an equivalent entry
            return
        else:
            _discard(final, why)
    raise OSError(f"could not publish cache entry {final}: it keeps being replaced")


def _sweep(folder: Path) -> None:
    """Delete temp and trash folders left by killed processes (their pid is gone)."""
    for stale in [*folder.glob(".tmp-*"), *folder.glob(".trash-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def fill(stage: str, cache_key: str) -> Iterator[Path]:
    """Yield a temp folder to write the entry into; seal and publish it atomically when the block succeeds."""
    final = entry(stage, cache_key)
    tmp = final.with_name(f".tmp-{cache_key}-{os.getpid()}")
    _sweep(final.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        seal(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Stage outputs through the cache: an unchanged re-run copies the entry, does no work.

_OUT = "@OUT_DIR@"  # result.json stores paths relative to the stage folder under this marker


def _copy_tree(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in (MANIFEST, "result.json"):
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
    hit = lookup(stage, key)
    if hit is not None:
        _copy_tree(hit, out_dir)
        result = load_result(hit, out_dir)
    else:
        result = compute(out_dir)
        with fill(stage, key) as entry:
            _copy_tree(out_dir, entry)
            save_result(entry, result, out_dir)
    result.setdefault("metrics", {})[names.stage_cache_hit(stage)] = int(hit is not None)
    result["cache_key"] = key
    return result
