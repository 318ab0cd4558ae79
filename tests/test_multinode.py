"""Two ``cfl-sftp serve`` processes on one PostgreSQL database and one data folder, behind HAProxy (SPEC 9).

Every connection goes through the private HAProxy of :mod:`tests.cluster` with ``send-proxy-v2``; both nodes run
with ``proxy_protocol = true``. The only addresses we have are loopback ones, so where the client's own address
matters the tests use two: ``::1`` (the "attacker") and ``127.0.0.1`` (HAProxy talks to the nodes over
``127.0.0.1`` whatever the client used, so an entry naming ``::1`` can only come from the header), and the client's
own port where one address is enough.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import select

from cfl_sftp.storage.models import AuditEntryRow, UploadRow
from tests.cluster import Cluster, running_cluster
from tests.databases import fresh_postgresql_database
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build, image_of
from tests.sftp_support import CLIENT_TIMEOUT, IMAGE_PATH, TEST_SETTINGS

SPEC = PackageSpec(image_size=64 << 10)

pytestmark = pytest.mark.slow  # each test starts two nodes and HAProxy: several seconds


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DeploymentUnderTest]:
    settings = getattr(request, "param", {})
    with fresh_postgresql_database() as url:
        td = make_deployment(tmp_path, database_url=url,
                             settings={**TEST_SETTINGS, "proxy_protocol": "true", **settings})
        try:
            yield td
        finally:
            td.deployment.close()


@pytest.fixture
def cluster(deployment: DeploymentUnderTest, tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(deployment.root, tmp_path) as running:
        yield running


def with_limits(**limits: int) -> Any:
    return pytest.mark.parametrize("deployment", [{k: str(v) for k, v in limits.items()}], indirect=True)


async def connect(td: DeploymentUnderTest, port: int, user: str, host: str = "127.0.0.1",
                  key: asyncssh.SSHKey | str | None = None) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(
        asyncssh.connect(host, port, username=user, client_keys=[key or str(td.key_path(user))], known_hosts=None,
                         agent_path=None, config=None, preferred_auth="publickey"),
        CLIENT_TIMEOUT,
    )


async def upload(td: DeploymentUnderTest, port: int, data: bytes, name: str) -> None:
    async with await connect(td, port, "acme-release") as conn, conn.start_sftp_client() as sftp, \
            sftp.open(f"/incoming/{name}", "wb") as f:
        await f.write(data)


def audit_entries(td: DeploymentUnderTest) -> list[dict[str, Any]]:
    with td.deployment.db.reading() as db:
        return [json.loads(e) for e in db.execute(select(AuditEntryRow.entry).order_by(AuditEntryRow.seq)).scalars()]


async def wait_for_entries(td: DeploymentUnderTest, event: str, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(200):
        found = [e for e in await asyncio.to_thread(audit_entries, td) if e["event"] == event]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    return found


async def test_an_image_uploaded_through_one_node_downloads_through_the_other(
    deployment: DeploymentUnderTest, cluster: Cluster
) -> None:
    await upload(deployment, cluster.via(0), build(SPEC), "firmware.cfl")
    async with await connect(deployment, cluster.via(1), "northern-ops") as conn, \
            conn.start_sftp_client() as sftp:
        for _ in range(100):  # node 1 sees the library change within its catalogue poll (1 s)
            if await sftp.exists(IMAGE_PATH):
                break
            await asyncio.sleep(0.05)
        async with sftp.open(IMAGE_PATH, "rb") as f:
            assert await f.read() == image_of(SPEC)


async def test_haproxy_health_checks_with_a_local_header_keep_both_nodes_in_service(
    deployment: DeploymentUnderTest, cluster: Cluster
) -> None:
    await asyncio.sleep(1.0)  # five rounds of checks; a single failed one takes a node out (tests/cluster.py)
    for _ in range(4):
        async with await connect(deployment, cluster.balanced_port, "northern-ops") as conn, \
                conn.start_sftp_client() as sftp:
            await sftp.listdir("/")
    per_node = [sum(line.get("event") == "login_accepted" for line in cluster.log_lines(i)) for i in (0, 1)]
    assert per_node == [2, 2]  # round robin over two nodes that are both up


async def test_one_audit_log_without_gap_or_duplicate_across_both_nodes(
    deployment: DeploymentUnderTest, cluster: Cluster
) -> None:
    async def session(port: int) -> None:
        async with await connect(deployment, port, "northern-ops") as conn, conn.start_sftp_client() as sftp:
            await sftp.listdir("/images")

    await asyncio.gather(*(session(cluster.via(i % 2)) for i in range(16)))
    closed = await wait_for_entries(deployment, "session-closed", 16)
    assert len(closed) == 16
    seqs = [e["seq"] for e in await asyncio.to_thread(audit_entries, deployment)]
    assert seqs == list(range(1, len(seqs) + 1))
    per_node = [sum(line.get("event") == "login_accepted" for line in cluster.log_lines(i)) for i in (0, 1)]
    assert per_node == [8, 8]  # both nodes appended to the one trail


async def test_the_same_package_on_both_nodes_at_once_is_accepted_once_and_held_once(
    deployment: DeploymentUnderTest, cluster: Cluster
) -> None:
    data = build(SPEC)
    await asyncio.gather(upload(deployment, cluster.via(0), data, "a.cfl"),
                         upload(deployment, cluster.via(1), data, "b.cfl"))
    with deployment.deployment.db.reading() as db:
        outcomes = sorted((r.outcome, r.reason) for r in db.execute(select(UploadRow)).scalars())
    assert outcomes == [("accepted", "accepted"), ("held", "duplicate-image")]


@with_limits(failed_logins_per_address=3, ban_seconds=120)
async def test_a_ban_decided_through_the_balancer_holds_on_both_nodes(
    deployment: DeploymentUnderTest, cluster: Cluster
) -> None:
    if not cluster.ipv6:
        pytest.skip("needs ::1 to tell the banned client from another one")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    for _ in range(3):  # round robin: the failures land on both nodes
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(deployment, cluster.balanced_port, "northern-ops", "::1", stranger)
    banned = await wait_for_entries(deployment, "address-banned")
    assert [(e["peer"], e["details"]["failed_logins"]) for e in banned] == [("::1", 3)]
    await asyncio.sleep(1.5)  # each node refreshes its ban cache every 0.5 s
    for node in (0, 1):
        with pytest.raises((OSError, asyncssh.Error)):
            await connect(deployment, cluster.via(node), "northern-ops", "::1")  # even with a good key
        async with await connect(deployment, cluster.via(node), "northern-ops", "127.0.0.1"):
            pass  # another client address still gets in
    refused = await wait_for_entries(deployment, "session-refused", 2)
    assert sorted((e["peer"], e["details"]["reason"]) for e in refused) == [("::1", "address-banned")] * 2


@with_limits(sessions_per_user=1)
async def test_the_session_limit_counts_both_nodes(deployment: DeploymentUnderTest, cluster: Cluster) -> None:
    async with await connect(deployment, cluster.via(0), "northern-ops") as first:
        sftp = await first.start_sftp_client()
        second = await connect(deployment, cluster.via(1), "northern-ops")
        client_port = second.get_extra_info("sockname")[1]
        with pytest.raises((asyncssh.Error, OSError)):
            await asyncio.wait_for(second.start_sftp_client(), CLIENT_TIMEOUT)
        second.close()
        assert "images" in await sftp.listdir("/")
        refused = await wait_for_entries(deployment, "session-refused")
        assert [(e["actor"], e["peer"], e["details"]["reason"]) for e in refused] == [
            ("northern-ops", f"127.0.0.1:{client_port}", "sessions-per-user")]
    for _ in range(100):  # the first session's row goes when it closes; then the other node admits one
        try:
            async with await connect(deployment, cluster.via(1), "northern-ops") as again:
                await asyncio.wait_for(again.start_sftp_client(), CLIENT_TIMEOUT)
                break
        except (asyncssh.Error, OSError):
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("node 1 never admitted the user again")
