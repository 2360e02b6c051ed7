"""What each registered version of a model name trained and was judged on, kept in the state dir.

`<state>/history/<name>/v<version>/`: index.jsonl (one row per record of the version's splits: content key,
split, id, source), signatures.npy (their MinHash rows, same order, made with the settings in
minhash.json), test.jsonl (the test items it was judged on, whole: the frozen evaluation set),
benchmarks.json (the benchmark tasks it was swept on: name, content fingerprint, item count; absent when
its run swept none) and version.json (version, run, counts, when) written last. A version folder is
written in a temp folder and renamed into place, so a killed process never leaves half of one; a folder
without version.json is not read. The data stage reads every version to keep earlier test items out of
training (tasks/data/seen.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftflow import env
from sftflow.errors import UserError
from sftflow.records import read_jsonl

FILES = ("index.jsonl", "signatures.npy", "test.jsonl", "minhash.json")  # what the split stage writes for it
DONE = "version.json"
BENCHMARKS = "benchmarks.json"


class HistoryError(UserError, RuntimeError):
    pass


def folder(name: str) -> Path:
    return env.state_dir() / "history" / name


@dataclass
class Version:
    version: int
    path: Path
    meta: dict
    index: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return self.meta.get("counts", {})


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def record(name: str, version: int, split_dir: Path, meta: dict, judged_on: Path | None = None,
           benchmark_tasks: Path | None = None) -> Path:
    """Add `version` of `name` from a run's split stage folder; idempotent for a version already recorded.
    `judged_on`: the held-out items it was evaluated on when that was more than its test split (an earlier
    champion's frozen items included), kept as its test.jsonl; `benchmark_tasks`: the benchmark stage's
    tasks.json."""
    target = folder(name) / f"v{version}"
    if (target / DONE).is_file():
        return target
    missing = [f for f in FILES if not (split_dir / f).is_file()]
    if missing:
        raise HistoryError(f"{split_dir}: no {', '.join(missing)} for the history of `{name}` v{version}; "
                           "the run's data stage predates the history")
    index = list(read_jsonl(split_dir / "index.jsonl"))
    counts = {s: sum(r["split"] == s for r in index) for s in ("train", "val", "test")}
    tmp = folder(name) / f".v{version}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in FILES:
        shutil.copyfile(judged_on if f == "test.jsonl" and judged_on else split_dir / f, tmp / f)
    if benchmark_tasks is not None:
        shutil.copyfile(benchmark_tasks, tmp / BENCHMARKS)
    minhash = json.loads((split_dir / "minhash.json").read_text())
    (tmp / DONE).write_text(json.dumps({"version": version, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "counts": counts, "minhash": minhash, **meta}, indent=2, sort_keys=True))
    _fsync_tree(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process recorded it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / DONE).is_file():
            raise
    return target


def versions(name: str, with_index: bool = False) -> list[Version]:
    """Recorded versions of `name`, oldest first; a damaged one is an error that names it."""
    out = []
    root = folder(name)
    for path in sorted(root.glob("v*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1):
        if not path.name[1:].isdigit() or not (path / DONE).is_file():
            continue
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise HistoryError(f"history of `{name}` is damaged: {path} lacks {', '.join(missing)}; restore it, or "
                               f"move the folder away to forget that version's data (its test items may then train)")
        meta = json.loads((path / DONE).read_text())
        index = list(read_jsonl(path / "index.jsonl")) if with_index else []
        out.append(Version(int(path.name[1:]), path, meta, index))
    return out


def benchmark_tasks(path: Path) -> dict[str, str] | None:
    """{task name: content fingerprint} a version was swept on, from its folder; None when none was recorded."""
    file = path / BENCHMARKS
    return {t["name"]: t["fingerprint"] for t in json.loads(file.read_text())} if file.is_file() else None


def signatures(v: Version) -> np.ndarray:
    sig = np.load(v.path / "signatures.npy")
    if len(sig) != len(v.index):
        raise HistoryError(f"history of v{v.version} is damaged: {len(sig)} signatures for {len(v.index)} records "
                           f"in {v.path}")
    return sig


def files(name: str) -> list[Path]:
    """Every file the history of `name` holds (a cache key of the data stage depends on them)."""
    return sorted(p for v in versions(name) for p in (v.path / f for f in (*FILES, DONE)))
