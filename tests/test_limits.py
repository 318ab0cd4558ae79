"""Abuse limits (SPEC 9 ``[limits]``) through a real server: each refusal is enforced, logged and audited."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncssh
import pytest
from sqlalchemy import select

from cfl_sftp.service import node_endpoint, start
from cfl_sftp.sftp.limits import SessionLedger
from cfl_sftp.storage import limits_store
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.limits_store import OpenSession
from cfl_sftp.storage.models import BanRow, NodeRow, OpenSessionRow
from tests.cluster import free_port
from tests.deployments import DeploymentUnderTest
from tests.sftp_support import CLIENT_TIMEOUT, SftpServer, start_sftp_server


async def connect_with(server: SftpServer, user: str, key: asyncssh.SSHKey | str) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(
        asyncssh.connect("127.0.0.1", server.port, username=user, client_keys=[key], known_hosts=None,
                         agent_path=None, config=None, preferred_auth="publickey"),
        CLIENT_TIMEOUT,
    )


async def test_an_address_is_banned_after_too_many_failed_logins(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"failed_logins_per_address": "2", "ban_seconds": "60"})
    try:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        for _ in range(2):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect_with(server, "northern-ops", stranger)
        await asyncio.sleep(0.2)  # the server sees each connection end
        with pytest.raises((OSError, asyncssh.Error)):
            await connect_with(server, "northern-ops", str(server.key("northern-ops")))  # even a good key
        banned = await server.wait_for_audit("address-banned")
        assert [(e["peer"], e["details"]["failed_logins"]) for e in banned] == [("127.0.0.1", 2)]
        refused = await server.wait_for_audit("session-refused")
        assert refused[0]["details"]["reason"] == "address-banned"
    finally:
        await server.service.stop()


async def test_sessions_past_the_per_user_limit_are_refused(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"sessions_per_user": "1"})
    try:
        async with await connect_with(server, "northern-ops", str(server.key("northern-ops"))) as first:
            sftp = await first.start_sftp_client()  # admitted: its session channel is open
            second = await connect_with(server, "northern-ops", str(server.key("northern-ops")))
            with pytest.raises((asyncssh.Error, OSError)):
                await asyncio.wait_for(second.start_sftp_client(), CLIENT_TIMEOUT)
            second.close()
            assert "images" in await sftp.listdir("/")  # the first session is untouched
        refused = await server.wait_for_audit("session-refused")
        assert [(e["actor"], e["details"]["reason"]) for e in refused] == [("northern-ops", "sessions-per-user")]
    finally:
        await server.service.stop()


async def test_logins_arriving_together_are_admitted_exactly_up_to_the_limit(tmp_path: Path) -> None:
    """Admissions are written in group commits: ten logins at once, limit three, must still admit exactly three,
    and once those end the user may log in again."""
    server = await start_sftp_server(tmp_path, {"sessions_per_user": "3"})
    key = str(server.key("northern-ops"))

    async def session() -> asyncssh.SSHClientConnection | None:
        conn = await connect_with(server, "northern-ops", key)
        try:
            await asyncio.wait_for(conn.start_sftp_client(), CLIENT_TIMEOUT)
        except (asyncssh.Error, OSError):
            conn.close()
            return None
        return conn

    try:
        results = await asyncio.gather(*(session() for _ in range(10)))
        admitted = [conn for conn in results if conn is not None]
        assert len(admitted) == 3
        for conn in admitted:
            conn.close()
            await conn.wait_closed()
        for _ in range(50):  # the ends are written in the next group commit
            again = await session()
            if again is not None:
                again.close()
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the user could not log in again after its sessions ended")
    finally:
        await server.service.stop()


async def test_unauthenticated_connections_are_capped(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"unauthenticated_connections": "1"})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # says nothing: unauthenticated
        await reader.readline()  # the server's SSH banner
        with pytest.raises((OSError, asyncssh.Error)):
            await connect_with(server, "northern-ops", str(server.key("northern-ops")))
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)
        async with await connect_with(server, "northern-ops", str(server.key("northern-ops"))):
            pass  # room again once the silent connection is gone
        refused = await server.wait_for_audit("session-refused")
        assert refused[0]["details"]["reason"] == "unauthenticated-connections"
    finally:
        await server.service.stop()


# -- shared through the database (cfl_sftp.storage.limits_store, on a real SQLite file) -----------------------

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def _session(session_id: str, node: str, user: str = "northern-ops", endpoint: str = "host 127.0.0.1:2222"
             ) -> OpenSession:
    return OpenSession(session_id=session_id, node_id=node, endpoint=endpoint, user=user, peer="127.0.0.1:1",
                       opened_at=NOW)


def _record(db: Database, *sessions: OpenSession) -> None:
    with db.writing() as session:
        session.add_all(OpenSessionRow(**opened._asdict()) for opened in sessions)


def _beat(db: Database, node: str, seconds_ago: int, now: dt.datetime = NOW) -> None:
    moment = now - dt.timedelta(seconds=seconds_ago)
    with db.writing() as session:
        session.add(NodeRow(node_id=node, kek_id="k", started_at=moment, last_seen=moment))


def test_sessions_of_a_node_silent_for_60_s_no_longer_count(td: DeploymentUnderTest) -> None:
    db = td.deployment.db
    _beat(db, "alive", 10)
    _beat(db, "dead", 61)
    live_after = NOW - dt.timedelta(seconds=60)
    _record(db, _session("s1", "alive"), _session("s2", "dead"))
    with db.writing_rows() as rows:  # "alive"'s session counts, "dead"'s does not: the limit of 2 has room
        assert limits_store.open_sessions(rows, [_session("s3", "me")], limit=2, live_after=live_after) == [2]
    with db.writing_rows() as rows:  # now it is full
        assert limits_store.open_sessions(rows, [_session("s4", "me")], limit=2, live_after=live_after) == [None]
    with db.writing() as session:
        limits_store.sweep(session, "me", NOW, live_after=live_after, failures_before=NOW)
    with db.reading() as session:
        assert sorted(session.scalars(select(OpenSessionRow.session_id))) == ["s1", "s3"]


def test_one_batch_of_admissions_counts_the_rows_it_admits_itself(td: DeploymentUnderTest) -> None:
    db = td.deployment.db
    live_after = NOW - dt.timedelta(seconds=60)
    _record(db, _session("s1", "me"))
    batch = [_session("s2", "me"), _session("g1", "me", user="northern-gas"), _session("s3", "me"),
             _session("g2", "me", user="northern-gas")]
    with db.writing_rows() as rows:
        assert limits_store.open_sessions(rows, batch, limit=2, live_after=live_after) == [2, 1, None, 2]
    with db.reading() as session:
        assert sorted(session.scalars(select(OpenSessionRow.session_id))) == ["g1", "g2", "s1", "s2"]


async def test_a_session_end_is_written_before_the_next_admission_of_its_node(td: DeploymentUnderTest) -> None:
    ledger = SessionLedger(td.deployment.db, lambda: 1, lambda: NOW)
    assert await ledger.open(_session("s1", "me")) == 1
    ended = ledger.close("s1")  # waits for an admission to share its transaction
    assert await ledger.open(_session("s2", "me")) == 1  # not refused: s1's end went first
    assert ended.done()
    assert await ledger.open(_session("s3", "me")) is None
    await asyncio.wait_for(ledger.close("s2"), 5)  # with no admission to wait for, written by itself
    with td.deployment.db.reading() as session:
        assert list(session.scalars(select(OpenSessionRow.session_id))) == []


def test_a_restarted_node_drops_the_sessions_its_previous_run_left(td: DeploymentUnderTest) -> None:
    db = td.deployment.db
    _record(db, _session("old", "run-1"), _session("other", "node-b", endpoint="host 127.0.0.1:2223"))
    with db.writing() as session:
        assert limits_store.drop_previous_runs(session, "host 127.0.0.1:2222", "run-2") == 1
    with db.reading() as session:
        assert list(session.scalars(select(OpenSessionRow.session_id))) == ["other"]


def test_failed_logins_from_any_node_add_up_to_one_ban(td: DeploymentUnderTest) -> None:
    db = td.deployment.db
    decided = []
    for i, node in enumerate(["a", "b", "a"]):
        with db.writing() as session:
            decided.append(limits_store.record_failed_login(
                session, "192.0.2.1", NOW + dt.timedelta(seconds=i), window_seconds=60, threshold=3,
                ban_seconds=60, node_id=node))
    assert decided == [None, None, 3]
    with db.writing() as session:  # a failure that began before the ban decides nothing more
        assert limits_store.record_failed_login(session, "192.0.2.1", NOW, window_seconds=60, threshold=1,
                                                ban_seconds=60, node_id="b") is None
    with db.reading() as session:
        assert limits_store.active_bans(session, NOW + dt.timedelta(seconds=61)) == {
            "192.0.2.1": NOW + dt.timedelta(seconds=62)}
        assert limits_store.active_bans(session, NOW + dt.timedelta(seconds=62)) == {}


# -- shared limits through a real server ------------------------------------------------------------------


async def test_a_ban_written_by_another_node_is_refused_here(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path)
    try:
        now = dt.datetime.now(dt.UTC)
        with server.td.deployment.db.writing() as session:  # as another node deciding a ban would
            session.add(BanRow(address="127.0.0.1", until=now + dt.timedelta(seconds=60), banned_at=now,
                               failed_logins=10, node_id="other-node"))
        for _ in range(100):  # the ban cache is refreshed every 0.5 s
            try:
                async with await connect_with(server, "northern-ops", str(server.key("northern-ops"))):
                    pass
            except (OSError, asyncssh.Error):
                break
            await asyncio.sleep(0.1)
        refused = await server.wait_for_audit("session-refused")
        assert [(e["peer"], e["details"]["reason"]) for e in refused] == [("127.0.0.1", "address-banned")]
        assert server.audit_events("address-banned") == []  # the deciding node audits the ban, not this one
    finally:
        await server.service.stop()


async def test_sessions_on_a_dead_node_do_not_count_against_the_limit(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"sessions_per_user": "1"})
    try:
        db = server.td.deployment.db
        _beat(db, "dead-node", 61, dt.datetime.now(dt.UTC))
        _record(db, _session("left-behind", "dead-node"))
        async with server.sftp("northern-ops") as sftp:
            assert "images" in await sftp.listdir("/")
        assert server.audit_events("session-refused") == []
    finally:
        await server.service.stop()


async def test_a_restarted_node_drops_what_its_previous_run_left(tmp_path: Path) -> None:
    port = free_port()
    td_settings = {"listen": f'["127.0.0.1:{port}"]', "sessions_per_user": "1"}
    server = await start_sftp_server(tmp_path, td_settings)
    endpoint = node_endpoint(server.service.servers)
    await server.service.stop()
    db = Database(server.td.deployment.config.database_url)
    try:
        _beat(db, "previous-run", 0, dt.datetime.now(dt.UTC))  # not yet 60 s silent: only the endpoint tells
        _record(db, _session("stale", "previous-run", endpoint=endpoint))
    finally:
        db.dispose()
    again = await start(server.td.deployment.config)
    try:
        with again.runtime.deployment.db.reading() as session:
            assert list(session.scalars(select(OpenSessionRow.session_id))) == []
    finally:
        await again.stop()
