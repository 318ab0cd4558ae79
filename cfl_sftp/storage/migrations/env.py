"""Alembic environment: runs on the connection that ``Database.upgrade`` passes in, under its lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from cfl_sftp.storage.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        assert url, "Database.upgrade() passes a connection; alembic CLI use needs sqlalchemy.url"
        with create_engine(url).connect() as own:
            _run(own)
            own.commit()
        return
    _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
