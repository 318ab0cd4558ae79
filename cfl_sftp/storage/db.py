"""Database engines, transactions and schema migrations.

Two kinds of transaction: ``reading()`` for lookups and ``writing()`` for changes. On SQLite a writing
transaction starts with ``BEGIN IMMEDIATE`` so that read-modify-write sequences (the audit ``seq``) cannot race
between processes; on PostgreSQL the audit head row is locked ``FOR UPDATE`` instead (see ``audit_store``).
The schema is Alembic's alone: ``upgrade()`` runs the migrations under a lock (a file lock beside a SQLite
database, an advisory lock on PostgreSQL) so that nodes starting together do not race, and ``serve`` refuses an
older schema.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x6366_6C01  # arbitrary constant: "cfl" + 1


class SchemaError(Exception):
    """The database schema is older (or newer) than this version of cfl-sftp expects."""


SQLITE_BUSY_SECONDS = 30.0
"""How long a SQLite transaction waits for another process's lock before it fails (and the node counts the
database as unreachable until a write succeeds again)."""

POSTGRESQL_CONNECT_ARGS = {
    "connect_timeout": 5,  # an unreachable server fails a request in seconds, not at the TCP timeout
    # A connection whose server vanished without a FIN (a network cut) is noticed in about 20 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
}


def _sqlite_engine(url: str, *, immediate: bool, busy_seconds: float) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_seconds})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_seconds * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """The engines and session factories for one database URL."""

    def __init__(self, url: str, *, sqlite_busy_seconds: float = SQLITE_BUSY_SECONDS) -> None:
        """PostgreSQL connections are checked before use (``pool_pre_ping``) and replaced hourly, so that after
        an outage the pool refills by itself with fresh connections instead of failing on dead ones."""
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self._read_engine = _sqlite_engine(url, immediate=False, busy_seconds=sqlite_busy_seconds)
            self._write_engine = _sqlite_engine(url, immediate=True, busy_seconds=sqlite_busy_seconds)
        else:
            connect_args = POSTGRESQL_CONNECT_ARGS if parsed.get_driver_name() == "psycopg" else {}
            self._read_engine = self._write_engine = create_engine(
                url, pool_pre_ping=True, pool_size=10, pool_recycle=3600,
                connect_args=connect_args,
            )
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction for lookups only. Loaded objects stay usable after it ends (no expiry)."""
        with self._reader() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that commits when the block ends without an exception."""
        with self._writer() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def writing_rows(self) -> Iterator[Connection]:
        """A transaction on a bare Core connection, committed when the block ends without an exception.

        For the writers on the login path (the open-sessions ledger, the audit writer's group commits), which run
        prepared Core statements on plain values: an ORM session and its unit of work cost about as much again as
        the statements.
        """
        with self._write_engine.begin() as connection:
            yield connection

    @property
    def engine(self) -> Engine:
        return self._write_engine

    def dispose(self) -> None:
        self._read_engine.dispose()
        self._write_engine.dispose()

    # -- schema -----------------------------------------------------------------------------------------

    def _alembic_config(self, connection: Connection) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = connection
        return cfg

    def head_revision(self) -> str | None:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()

    def current_revision(self) -> str | None:
        with self._read_engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        if self.is_sqlite:
            db_path = make_url(self.url).database
            lock_path = Path(f"{db_path}.migrate-lock") if db_path else None
            with contextlib.ExitStack() as stack:
                if lock_path is not None:
                    handle = stack.enter_context(lock_path.open("a"))
                    fcntl.flock(handle, fcntl.LOCK_EX)
                connection = stack.enter_context(self._read_engine.connect())
                yield connection
        else:
            with self._write_engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                connection.commit()
                try:
                    yield connection
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                    connection.commit()

    def upgrade(self) -> None:
        """Apply every pending migration, under a lock shared by every process using this database."""
        with self._migration_lock() as connection:
            command.upgrade(self._alembic_config(connection), "head")
            connection.commit()

    def upgrade_if_empty(self) -> None:
        """Create the schema in an empty database; refuse to start on an older one (SPEC 9)."""
        current = self.current_revision()
        if current is None:
            self.upgrade()
            current = self.current_revision()
        if current != self.head_revision():
            raise SchemaError(
                f"database schema is at {current}, this version needs {self.head_revision()}: "
                "run `cfl-sftp db upgrade`"
            )
