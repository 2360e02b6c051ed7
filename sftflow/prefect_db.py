"""A new Prefect database starts as a copy of one migrated once per Prefect version, not migrated in place.

Prefect migrates a new SQLite database in a long series of steps (about a minute on 2 cores) the first time a
server starts on it: every new state dir, every `sftflow up` on a fresh one. The schema a version migrates to is
the same every time, so the first start migrates a template under the user's cache dir and every new database
after that is a copy of it (well under a second). A database that exists is never touched: Prefect still upgrades
it on start as it always does.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

SQLITE_PREFIX = "sqlite+aiosqlite:///"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sftflow"


def database_path(settings=None) -> Path | None:
    """The SQLite file Prefect's server would use, or None when it uses another database."""
    from prefect.settings import get_current_settings

    url = (settings or get_current_settings()).server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if not url.startswith(SQLITE_PREFIX) or url.endswith(":memory:"):
        return None
    return Path(url.removeprefix(SQLITE_PREFIX).split("?")[0])


def template() -> Path:
    """The migrated template for the installed Prefect, made on first use (under a lock, so two first runs
    migrate once)."""
    import prefect

    path = cache_dir() / f"prefect-{prefect.__version__}.db"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / (path.name + ".lock")).open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the process dies
        if not path.exists():
            _migrate_into(path)
    return path


def _migrate_into(path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        work = Path(tmp) / "migrating.db"
        environ = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE_PREFIX + str(work)}
        done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                              env=environ, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"migrating a Prefect database failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        # VACUUM INTO writes one self-contained file: no WAL or journal left beside it to lose in a copy.
        packed = Path(tmp) / "packed.db"
        with sqlite3.connect(work) as conn:
            conn.execute("VACUUM INTO ?", (str(packed),))
        conn.close()
        os.replace(packed, path)


def seed(db: Path | None = None) -> bool:
    """Copy the template to Prefect's database file when there is none yet -> whether it copied. Callers hold the
    lock that orders server starts on this database, so nobody opens it half-copied."""
    db = db or database_path()
    if db is None or db.exists():
        return False
    source = template()
    db.parent.mkdir(parents=True, exist_ok=True)
    part = db.with_name(db.name + ".seeding")
    part.write_bytes(source.read_bytes())
    os.replace(part, db)
    return True
