"""A new Prefect database is a copy of the template migrated once per Prefect version: at Prefect's newest
schema, copied only where no database exists, never over one."""

import sqlite3
from pathlib import Path

import pytest
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

from sftflow import prefect_db


def revision(db) -> str:
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    conn.close()
    return version


def newest_revisions() -> list[str]:
    """The heads of the SQLite migrations this Prefect ships."""
    import prefect.server.database
    from alembic.script import ScriptDirectory
    from prefect.server.database.alembic_commands import alembic_config

    config = alembic_config()
    versions = Path(prefect.server.database.__file__).parent / "_migrations" / "versions" / "sqlite"
    config.set_main_option("version_locations", str(versions))
    return ScriptDirectory.from_config(config).get_heads()


def test_the_template_is_at_the_newest_schema_prefect_ships():
    template = prefect_db.template()
    assert template.parent == prefect_db.cache_dir() and template.name.startswith("prefect-")
    assert newest_revisions() == [revision(template)]
    assert prefect_db.template() == template  # made once: the second call finds it


def test_seed_copies_the_template_where_no_database_is_and_leaves_an_existing_one_alone(tmp_path):
    db = tmp_path / "home" / "prefect.db"
    assert prefect_db.seed(db) is True
    assert db.read_bytes() == prefect_db.template().read_bytes()
    assert not list(db.parent.glob("*.seeding"))  # written aside, then renamed into place
    db.write_bytes(b"a user's database")
    assert prefect_db.seed(db) is False and db.read_bytes() == b"a user's database"


def test_only_a_sqlite_file_is_seeded(tmp_path):
    db = tmp_path / "server.db"
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        assert prefect_db.database_path() == db
        assert prefect_db.seed() is True and db.exists()
    for url in ("sqlite+aiosqlite:///:memory:", "postgresql+asyncpg://u@127.0.0.1/prefect"):
        with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: url}):
            assert prefect_db.database_path() is None and prefect_db.seed() is False


@pytest.mark.slow
def test_a_first_use_migrates_a_template_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made = prefect_db.template()  # Prefect's own `database upgrade`, in a subprocess
    assert made.parent == tmp_path / "cache" / "sftflow" and newest_revisions() == [revision(made)]
    assert sorted(p.name for p in made.parent.iterdir()) == [made.name, made.name + ".lock"]  # no work files left
