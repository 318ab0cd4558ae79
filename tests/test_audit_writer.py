"""Audit entries nobody waits on: group commits, and refused logins counted per address and minute."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncssh
import pytest
from sqlalchemy import select

from cfl_sftp.audit_writer import AuditWriter
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.models import AuditEntryRow
from tests.deployments import DeploymentUnderTest
from tests.sftp_support import CLIENT_TIMEOUT, SftpServer


async def test_queued_events_share_commits_and_keep_seq_without_gaps(td: DeploymentUnderTest) -> None:
    writer = AuditWriter(td.deployment.db)
    for n in range(120):
        writer.submit(AuditEvent("session-closed", f"user{n}", "org", "127.0.0.1:1", {"n": n}))
    await writer.flush()
    with td.deployment.db.reading() as session:
        seqs = list(session.execute(select(AuditEntryRow.seq).order_by(AuditEntryRow.seq)).scalars())
    assert seqs == list(range(1, 121))


async def test_a_flush_cancelled_by_a_stop_loses_nothing_and_writes_nothing_twice(td: DeploymentUnderTest) -> None:
    """A stop cancels the writer, possibly in the middle of a long flush (a queue built up during an outage): the
    entries it had not written yet stay queued for the stop's final flush."""
    writer = AuditWriter(td.deployment.db)
    total = 3 * 500 + 7  # several batches
    for n in range(total):
        writer.submit(AuditEvent("session-closed", f"user{n}", "org", "127.0.0.1:1", {"n": n}))
    flushing = asyncio.ensure_future(writer.flush())
    await asyncio.sleep(0)  # it has handed its first batch to a thread
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert await writer.flush(everything=True) is True
    with td.deployment.db.reading() as session:
        entries = list(session.execute(select(AuditEntryRow.seq, AuditEntryRow.entry).order_by(AuditEntryRow.seq)))
    assert [seq for seq, _ in entries] == list(range(1, total + 1))
    assert sorted(json.loads(raw)["details"]["n"] for _, raw in entries) == list(range(total))


async def test_refusals_become_one_entry_per_address_and_minute(td: DeploymentUnderTest) -> None:
    writer = AuditWriter(td.deployment.db)
    minute = dt.datetime(2026, 11, 24, 9, 0, 10, tzinfo=dt.UTC)
    for _ in range(5):
        writer.login_refused("192.0.2.7", minute)
    writer.login_refused("192.0.2.8", minute)
    writer.login_refused("192.0.2.7", minute + dt.timedelta(minutes=1))
    await writer.flush(everything=True)
    with td.deployment.db.reading() as session:
        rows = list(session.execute(select(AuditEntryRow.entry).where(AuditEntryRow.event == "login-refused")))
    counts = sorted((e["peer"], e["details"]["minute"], e["details"]["count"]) for (raw,) in rows
                    for e in [json.loads(raw)])
    assert counts == [
        ("192.0.2.7", "2026-11-24T09:00Z", 5),
        ("192.0.2.7", "2026-11-24T09:01Z", 1),
        ("192.0.2.8", "2026-11-24T09:00Z", 1),
    ]


async def test_logins_with_an_unknown_key_are_counted_not_logged_one_by_one(sftp_server: SftpServer) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    for _ in range(3):
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncio.wait_for(
                asyncssh.connect("127.0.0.1", sftp_server.port, username="northern-ops", client_keys=[stranger],
                                 known_hosts=None, agent_path=None, config=None, preferred_auth="publickey"),
                CLIENT_TIMEOUT,
            )
    await asyncio.sleep(0.2)  # connection_lost runs after the client's error
    await sftp_server.service.runtime.audit_writer.flush(everything=True)
    entries = sftp_server.audit_events("login-refused")
    assert sum(e["details"]["count"] for e in entries) == 3
    assert len(entries) <= 2  # one per minute (two if the test straddled a minute)
    assert sftp_server.audit_events("login-accepted") == []
