"""A real cfl-sftp service on 127.0.0.1 and the real clients that talk to it (SPEC 4, 5).

The service runs in the test's own event loop (``cfl_sftp.service.start`` on an ephemeral port), so nothing here
may block that loop: external clients run with ``asyncio.create_subprocess_exec``, paramiko (which blocks) runs in
``asyncio.to_thread``, and every wait is bounded. :class:`SftpServer` bundles the service with one helper per
client:

* :meth:`SftpServer.sftp` - asyncssh's SFTP client (exposes status codes, so it is the client for non-existence
  and permission checks);
* :meth:`SftpServer.openssh` - the OpenSSH ``sftp`` binary in batch mode (``-b -``), :meth:`SftpServer.scp`;
* :meth:`SftpServer.paramiko` - a connected ``paramiko.SFTPClient`` for use inside ``asyncio.to_thread``;
* :meth:`SftpServer.rclone`, :meth:`SftpServer.lftp` - the Debian packages, skipped with a reason when missing.

Library content is seeded through the gateway itself (:meth:`SftpServer.seed`), as an upload would put it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import select

from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.receipt import Receipt
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks
from cfl_sftp.service import RunningService, start
from cfl_sftp.storage.models import AuditEntryRow, ImageRow, StagingPartRow, UploadRow
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build

CLIENT_TIMEOUT = 60.0
"""Upper bound for one external client run or one SFTP operation; tests that hang fail instead."""

IMAGE_DIR = "/images/ESME/1A2B/0001/0100/00000010"
IMAGE_PATH = f"{IMAGE_DIR}/firmware.bin"
CHF_IMAGE_DIR = "/images/CHF/1A2B/0002/0100/00000010"

SEEDED_ESME = PackageSpec(release_notes=b"# Release notes\nFixes the tariff switch.\n")
"""The ESME image that ``seeded_server`` holds (entitled to ``northern-ops``, not to the other suppliers)."""
SEEDED_CHF = PackageSpec(model_id="0002", device_type="CHF", release_notes=b"CHF notes: pairing fix.\n")
"""The CHF image of ``1A2B/0002/0100`` that ``seeded_server`` holds: in ``southern-power``'s estate, so entitled to
``southern-ops`` only (``northern-gas`` holds a role for CHF, but its estate has no such device). It carries release
notes, which ``southern-ops`` (no ``release-notes`` role) must not see."""

BIG_SPEC = PackageSpec(firmware_version="00000040", image_size=64 << 20)
"""A 64 MiB image: large enough for a gateway close to take a noticeable time and for memory to show."""

SSH_OPTIONS = (
    "-F", "/dev/null",
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=20",
)


def require_binary(name: str) -> str:
    """The binary's path, or skip the test saying which package provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/install-tools installs it; on Debian: apt-get install {name})")
    return path


@dataclass(frozen=True)
class ClientRun:
    """One finished run of an external client."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return f"{' '.join(self.argv)}\nexit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class RunningClient:
    """An external client started in the background; :meth:`finish` waits for it (bounded)."""

    def __init__(self, argv: Sequence[str], proc: asyncio.subprocess.Process, stdin: bytes | None) -> None:
        self.argv = tuple(argv)
        self.proc = proc
        self._task = asyncio.ensure_future(proc.communicate(stdin))

    async def finish(self, timeout: float = CLIENT_TIMEOUT) -> ClientRun:
        try:
            stdout, stderr = await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self.kill()
            stdout, stderr = await asyncio.wait_for(self._task, 10)
            raise AssertionError(
                f"client did not finish within {timeout} s: {' '.join(self.argv)}\n{stdout!r}\n{stderr!r}"
            ) from None
        assert self.proc.returncode is not None
        return ClientRun(self.argv, self.proc.returncode, stdout.decode(errors="replace"),
                         stderr.decode(errors="replace"))

    def kill(self) -> None:
        """SIGKILL this client (only the process this helper started)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


async def start_client(argv: Sequence[str], stdin: bytes | None = None,
                       env: dict[str, str] | None = None) -> RunningClient:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    return RunningClient(argv, proc, stdin)


async def run_client(argv: Sequence[str], stdin: bytes | None = None, env: dict[str, str] | None = None,
                     timeout: float = CLIENT_TIMEOUT) -> ClientRun:
    return await (await start_client(argv, stdin, env)).finish(timeout)


async def sftp_status(call: Awaitable[object]) -> int:
    """Await ``call`` (an SFTP request) and return the status it failed with, or ``FX_OK``."""
    return (await sftp_answer(call))[0]


async def sftp_answer(call: Awaitable[object]) -> tuple[int, str]:
    """Await ``call`` and return the status code and the server's message (``FX_OK`` and ``""`` on success)."""
    try:
        await asyncio.wait_for(call, CLIENT_TIMEOUT)
    except asyncssh.SFTPError as exc:
        return int(exc.code), str(exc.reason)
    return int(asyncssh.FX_OK), ""


def raw(sftp: asyncssh.SFTPClient) -> Any:
    """asyncssh's request layer under ``sftp``: one SFTP request per call (``opendir`` without ``readdir``,
    extension requests), for the checks that need a single protocol request and its exact answer."""
    return sftp._handler


@dataclass
class SftpServer:
    """A started service over a real deployment (:func:`tests.deployments.make_deployment`)."""

    td: DeploymentUnderTest
    service: RunningService
    tmp: Path

    @property
    def port(self) -> int:
        return self.service.ports[0]

    def key(self, user: str) -> Path:
        return self.td.key_path(user)

    # -- library content ---------------------------------------------------------------------------------

    async def seed(self, package: PackageSpec | bytes | None = None, who: str = "acme-release",
                   name: str = "seed.cfl") -> Receipt:
        """Put a package through the gateway directly (as an upload would) and make the service see it."""
        data = package if isinstance(package, bytes) else build(package or PackageSpec())
        organisation = {"acme-release": "acme-meters", "map-upload": "meter-assets",
                        "other-release": "other-meters", "northern-ops": "northern-energy"}[who]
        deployment = self.td.deployment

        def run() -> Receipt:
            upload = PackageUpload(deployment, Uploader(who, organisation, "127.0.0.1:1"), name)
            step = 1 << 20
            return feed_chunks(upload, (data[i : i + step] for i in range(0, len(data), step)))

        receipt = await asyncio.to_thread(run)
        await asyncio.to_thread(self.service.runtime.refresh_catalogue_now)
        return receipt

    # -- what the deployment holds -----------------------------------------------------------------------

    def uploads(self) -> list[UploadRow]:
        with self.td.deployment.db.reading() as db:
            rows = list(db.execute(select(UploadRow).order_by(UploadRow.received_at)).scalars())
            db.expunge_all()
        return rows

    def image_count(self) -> int:
        with self.td.deployment.db.reading() as db:
            return len(list(db.execute(select(ImageRow.id)).scalars()))

    def staging_rows(self) -> int:
        with self.td.deployment.db.reading() as db:
            return len(list(db.execute(select(StagingPartRow.id)).scalars()))

    def audit_events(self, event: str) -> list[dict[str, Any]]:
        with self.td.deployment.db.reading() as db:
            entries = db.execute(select(AuditEntryRow.entry).where(AuditEntryRow.event == event)).scalars()
            return [json.loads(e) for e in entries]

    async def wait_for_audit(self, event: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Audit entries may be written just after the answer (SPEC 8): poll for them, bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = await asyncio.to_thread(self.audit_events, event)
            if len(found) >= count or loop.time() > deadline:
                return found
            await asyncio.sleep(0.05)

    def stray_files(self) -> list[Path]:
        """Files in any temp folder of the deployment (data, vault and spool): none after an upload ends."""
        d = self.td.deployment
        return sorted(p for folder in (d.data.tmp, d.vault.tmp, d.spool.tmp) for p in folder.rglob("*")
                      if p.is_file())

    def spool_files(self) -> list[Path]:
        spool = self.td.deployment.spool
        return sorted(p for p in spool.root.rglob("*") if p.is_file())

    # -- asyncssh --------------------------------------------------------------------------------------

    async def connect(self, user: str) -> asyncssh.SSHClientConnection:
        return await asyncio.wait_for(
            asyncssh.connect(
                "127.0.0.1", self.port, username=user, client_keys=[str(self.key(user))], known_hosts=None,
                agent_path=None, config=None, preferred_auth="publickey",
            ),
            CLIENT_TIMEOUT,
        )

    @contextlib.asynccontextmanager
    async def sftp(self, user: str) -> AsyncIterator[asyncssh.SFTPClient]:
        async with await self.connect(user) as conn:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), CLIENT_TIMEOUT)
            try:
                yield sftp
            finally:
                sftp.exit()

    # -- OpenSSH ---------------------------------------------------------------------------------------

    def _ssh_options(self, user: str) -> list[str]:
        return [*SSH_OPTIONS, "-i", str(self.key(user))]

    async def start_openssh(self, user: str, commands: Sequence[str], options: Sequence[str] = ()) -> RunningClient:
        """Start ``sftp -b -`` in the background; ``options`` go before the destination (``-l`` limits Kbit/s)."""
        argv = [require_binary("sftp"), *self._ssh_options(user), "-P", str(self.port), *options, "-b", "-",
                f"{user}@127.0.0.1"]
        return await start_client(argv, ("\n".join(commands) + "\n").encode())

    async def openssh(self, user: str, *commands: str, timeout: float = CLIENT_TIMEOUT) -> ClientRun:
        """``sftp -b -`` with these commands; it stops at the first failing one and then exits 1."""
        return await (await self.start_openssh(user, commands)).finish(timeout)

    async def scp(self, user: str, *args: str) -> ClientRun:
        """``scp`` (SFTP protocol, OpenSSH 9's default); remote paths as ``:/path``, expanded here."""
        remote = f"{user}@127.0.0.1"
        expanded = [f"{remote}{a}" if a.startswith(":/") else a for a in args]
        argv = [require_binary("scp"), *self._ssh_options(user), "-P", str(self.port), "-s", *expanded]
        return await run_client(argv)

    # -- paramiko (blocking: only inside asyncio.to_thread) ----------------------------------------------

    @contextlib.contextmanager
    def paramiko(self, user: str) -> Iterator[Any]:
        import paramiko

        key = paramiko.Ed25519Key.from_private_key_file(str(self.key(user)))
        transport = paramiko.Transport(("127.0.0.1", self.port))
        try:
            transport.banner_timeout = CLIENT_TIMEOUT
            transport.connect(username=user, pkey=key)
            client = paramiko.SFTPClient.from_transport(transport)
            assert client is not None
            client.get_channel().settimeout(CLIENT_TIMEOUT)
            try:
                yield client
            finally:
                client.close()
        finally:
            transport.close()

    # -- rclone and lftp -------------------------------------------------------------------------------

    async def rclone(self, user: str, *args: str, timeout: float = CLIENT_TIMEOUT) -> ClientRun:
        """``rclone`` with an sftp remote ``srv:`` configured in a private config file."""
        binary = require_binary("rclone")
        config = self.tmp / f"rclone-{user}.conf"
        config.write_text(
            "[srv]\ntype = sftp\nhost = 127.0.0.1\n"
            f"port = {self.port}\nuser = {user}\nkey_file = {self.key(user)}\n"
            "shell_type = none\ndisable_hashcheck = true\n"
        )
        argv = [binary, "--config", str(config), "--low-level-retries", "1", "--retries", "1",
                "--contimeout", "20s", "--timeout", "30s", *args]
        cache = self.tmp / "rclone-cache"
        return await run_client(argv, env={"RCLONE_CACHE_DIR": str(cache), "HOME": str(self.tmp)},
                                timeout=timeout)

    async def lftp(self, user: str, *commands: str, timeout: float = CLIENT_TIMEOUT) -> ClientRun:
        """``lftp`` over ``sftp://`` with the user's key; ``commands`` run after ``open``."""
        binary = require_binary("lftp")
        require_binary("ssh")
        connect = "ssh -a -x " + " ".join([*SSH_OPTIONS, "-i", str(self.key(user))])
        script = "; ".join([
            f'set sftp:connect-program "{connect}"',
            "set net:max-retries 1",
            "set net:timeout 20",
            "set cmd:fail-exit yes",
            "set xfer:clobber yes",
            f"open -u {user}, -p {self.port} sftp://127.0.0.1",
            *commands,
        ])
        return await run_client([binary, "-c", script], env={"HOME": str(self.tmp)}, timeout=timeout)


TEST_SETTINGS = {
    "listen": '["127.0.0.1:0"]',
    # Only the Ed25519 host key (every client here picks it): loading the RSA one costs ~0.2 s at each service
    # start, because cryptography validates RSA private keys as it loads them.
    "host_keys": '["keys/ssh_host_ed25519_key"]',
}


def make_template(folder: Path) -> Path:
    """A deployment made once (host keys, key rings, migrated database, users' keys) for tests to copy."""
    td = make_deployment(folder, settings=TEST_SETTINGS)
    td.deployment.close()
    return folder


def copy_template(template: Path, tmp_path: Path) -> DeploymentUnderTest:
    """A private copy of :func:`make_template`'s deployment (much faster than ``cfl-sftp init`` per test)."""
    for name in ("deployment", "clients"):
        shutil.copytree(template / name, tmp_path / name, symlinks=True)
    config_path = tmp_path / "deployment" / "cfl-sftp.toml"
    deployment = Deployment.open(load_config(config_path))
    return DeploymentUnderTest(tmp_path / "deployment", config_path, deployment, tmp_path / "clients")


async def start_sftp_server(tmp_path: Path, settings: dict[str, str] | None = None,
                            template: Path | None = None) -> SftpServer:
    """Start the service on a fresh deployment: a copy of ``template`` when given and no ``settings`` differ."""
    if template is not None and not settings:
        td = await asyncio.to_thread(copy_template, template, tmp_path)
    else:
        td = make_deployment(tmp_path, settings={**TEST_SETTINGS, **(settings or {})})
    service = await start(td.deployment.config, td.deployment)
    client_tmp = tmp_path / "client"
    client_tmp.mkdir()
    return SftpServer(td, service, client_tmp)


_BUILT: dict[int, bytes] = {}


def built(spec: PackageSpec) -> bytes:
    """The spec's package, built once per test run (specs are module constants; large ones take seconds)."""
    if id(spec) not in _BUILT:
        _BUILT[id(spec)] = build(spec)
    return _BUILT[id(spec)]


async def wait_visible(sftp: asyncssh.SFTPClient, path: str, timeout: float = 10.0) -> asyncssh.SFTPAttrs:
    """Stat ``path`` until it exists: a new image reaches users' trees just after the verdict."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await sftp.stat(path)
        except asyncssh.SFTPNoSuchFile:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def receipt_named(sftp: asyncssh.SFTPClient, file_name: str) -> dict[str, Any]:
    """The receipt (read over SFTP from ``/receipts``) of the newest gateway run on ``file_name``."""
    found = []
    for name in await sftp.listdir("/receipts"):
        if name in (".", ".."):
            continue
        async with sftp.open(f"/receipts/{name}", "rb") as f:
            receipt = json.loads(await f.read())
        if receipt["file_name"] == file_name:
            found.append((receipt["received_at"], name, receipt))
    assert found, f"no receipt for {file_name}"
    _, name, receipt = max(found, key=lambda item: (item[0], item[1]))
    assert name == f"{receipt['upload_id']}.json"
    return receipt  # type: ignore[no-any-return]


async def read_all(sftp: asyncssh.SFTPClient, path: str) -> bytes:
    async with sftp.open(path, "rb") as f:
        data: bytes = await asyncio.wait_for(f.read(), CLIENT_TIMEOUT)
        return data


async def write_all(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    async with sftp.open(path, "wb") as f:
        await asyncio.wait_for(f.write(data), CLIENT_TIMEOUT)
