"""Fresh databases for tests: a SQLite file (always) and a PostgreSQL database when CI provides a server.

CI sets ``CFL_SFTP_TEST_POSTGRESQL_URL`` (``.ci/run``); without it the PostgreSQL variants skip with a reason.
Each PostgreSQL test gets its own database, created from the server URL and dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRESQL_URL_ENV = "CFL_SFTP_TEST_POSTGRESQL_URL"


def postgresql_server_url() -> str | None:
    return os.environ.get(POSTGRESQL_URL_ENV) or None


@contextmanager
def fresh_postgresql_database() -> Iterator[str]:
    """Create a uniquely named database on the test server; yield its URL; drop it at the end."""
    server = postgresql_server_url()
    if server is None:
        pytest.skip(f"PostgreSQL tests need {POSTGRESQL_URL_ENV} (set by .ci/run)")
    name = f"cfl_test_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
