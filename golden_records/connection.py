"""Opening the store: the engine, its SQLite tuning, and the schema brought to the
latest Alembic revision.

Kept apart from `store` (pandas, pyarrow) so that a command answering one
question (`mdm golden show`, `mdm why`) starts in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdm_pipeline.config.errors import StoreError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The latest revision in `migrations/versions` (a test checks it is Alembic's head): a
#: store already there is opened without loading Alembic at all.
HEAD = "0011"
#: Tables every store has had since the first release, before migrations existed.
_LEGACY_TABLES = {"mdm_runs", "mdm_source_records", "mdm_golden_records"}


def _alembic_config(conn: Connection) -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def upgrade(engine: Engine) -> None:
    """Bring the store's schema to the latest revision (creating it on an empty store).

    A store created before migrations existed has the first revision's tables
    but no version row: it is stamped as such, then upgraded like any other.
    """
    from alembic import command as alembic_command

    with engine.begin() as conn:
        names = set(sa.inspect(conn).get_table_names())
        config = _alembic_config(conn)
        if "alembic_version" not in names and names >= _LEGACY_TABLES:
            alembic_command.stamp(config, "0001")
        alembic_command.upgrade(config, "head")


def schema_revision(engine: Engine) -> str | None:
    """The store's current revision (None if it has none)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


#: SQLite's page cache per connection (KiB). Its default, 2 MiB, is a few thousand
#: pages: a night's writes into a store of gigabytes then read and write the same
#: index pages over and over through the operating system. Not much more either:
#: the cache is the process's own memory, which the kernel must zero page by page
#: the first time it is touched (on the project's virtual machines, 0.4-2 s a
#: gigabyte), while a page SQLite drops is still in the operating system's file
#: cache and comes back with one read. 512 MiB made a 5% incremental run at 1M
#: records about a second slower than 128 MiB, and the full run no faster
#: (docs/benchmarks.md, tenth pass).
SQLITE_CACHE_KIB = 128 * 1024


#: The rollback journal is kept between transactions (journal_mode PERSIST, its header
#: zeroed at commit) up to this size. A night rewrites the original of every page it
#: changes into it (0.9 GB for a 5% delta at 1M records): overwriting the blocks of
#: last night's journal instead of allocating a new file and deleting it after took
#: a quarter off the incremental run's SQL time (docs/benchmarks.md). Beyond the
#: limit, SQLite truncates the kept file after the commit.
SQLITE_JOURNAL_LIMIT_BYTES = 2 * 2**30


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    # No memory map (mmap_size 0, SQLite's default): reads through the map were no
    # faster (docs/benchmarks.md), and every page of the store it touched counted in
    # the process's resident memory: a million records' index builds mapped a
    # gigabyte of the file.
    cursor.execute("PRAGMA mmap_size = 0")
    cursor.execute("PRAGMA temp_store = MEMORY")
    cursor.execute("PRAGMA journal_mode = PERSIST")
    cursor.execute(f"PRAGMA journal_size_limit = {SQLITE_JOURNAL_LIMIT_BYTES}")
    cursor.close()


def connect(url: str) -> Engine:
    """An engine on the store, its schema created or upgraded if needed."""
    try:
        engine = sa.create_engine(url)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _tune_sqlite)
        if schema_revision(engine) != HEAD:
            upgrade(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(
            f"store {sa.engine.make_url(url).render_as_string(hide_password=True)}: "
            f"cannot open ({exc.__class__.__name__})"
        ) from None
    return engine
