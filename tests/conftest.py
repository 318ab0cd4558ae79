"""Shared fixtures: real deployments on real SQLite files (and PostgreSQL when CI provides it)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncssh.logging import SSHLogger

from cfl_sftp.event_loop import new_event_loop
from cfl_sftp.logs import skip_disabled_asyncssh_logs
from tests.databases import fresh_postgresql_database
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.sftp_support import SEEDED_CHF, SEEDED_ESME, SftpServer, make_template, start_sftp_server


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test, and the services it starts in its own loop, run on the loop ``cfl-sftp serve`` runs on
    (uvloop where installed): the suite checks what ships. One factory, so test names are unchanged."""
    return {"serve-loop": new_event_loop}


@pytest.fixture(params=["sqlite", "postgresql"])
def td(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeploymentUnderTest]:
    """A fresh deployment with the test policy set, on a SQLite file and, when CI provides a server, on
    PostgreSQL (a database of its own; SPEC 9's several-node backend). Tests that edit the SQLite file itself
    (tamper checks) are marked ``sqlite_only``."""
    if request.param == "postgresql" and request.node.get_closest_marker("sqlite_only") is not None:
        pytest.skip("edits the SQLite file directly")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgresql_database()) if request.param == "postgresql" else None
        deployment = make_deployment(tmp_path, database_url=url)
        yield deployment
        deployment.deployment.close()


# -- SFTP integration tests (tests/sftp_support.py) ----------------------------------------------------


@pytest.fixture(scope="session")
def sftp_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One deployment made per test run; each SFTP test starts its service on a private copy of it."""
    return make_template(tmp_path_factory.mktemp("sftp-template"))


@pytest.fixture
async def sftp_server(tmp_path: Path, sftp_template: Path) -> AsyncIterator[SftpServer]:
    """A running service on an ephemeral 127.0.0.1 port with the test policy set and an empty library."""
    server = await start_sftp_server(tmp_path, template=sftp_template)
    try:
        yield server
    finally:
        await server.service.stop()


@pytest.fixture
async def seeded_server(sftp_server: SftpServer) -> SftpServer:
    """:func:`sftp_server` with one ESME image of ``1A2B/0001/0100`` (firmware ``00000010``, release notes)
    and one CHF image of ``1A2B/0002/0100`` (``southern-ops`` only) in the library."""
    await sftp_server.seed(SEEDED_ESME)
    await sftp_server.seed(SEEDED_CHF, name="chf.cfl")
    return sftp_server


@pytest.fixture
def asyncssh_records() -> Iterator[list[logging.LogRecord]]:
    """asyncssh's records as its logger emits them (our level check in place), with its level and debug level
    restored afterwards."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    target = logging.getLogger("asyncssh")
    level, debug_level = target.level, SSHLogger._debug_level
    target.addHandler(handler)
    skip_disabled_asyncssh_logs()
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
        SSHLogger._debug_level = debug_level
