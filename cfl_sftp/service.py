"""``cfl-sftp serve``: wire the deployment, the policy in force and the SSH listener, and run until stopped.

Background duties run here too: noticing library changes made by other nodes, putting new policy sets in force,
expiring staging files, and signing audit checkpoints (within 60 s of any new entry, and once more at stop).
``SIGHUP`` re-reads the policy set at once; ``SIGTERM``/``SIGINT`` stop accepting connections, let open transfers
finish for up to ``stop_timeout_seconds``, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import socket
from dataclasses import dataclass

import asyncssh
import structlog

from cfl_sftp import recovery
from cfl_sftp.audit_trail import AuditSigner, make_checkpoint
from cfl_sftp.availability import DatabaseAvailability
from cfl_sftp.config import Config
from cfl_sftp.deployment import Deployment, KeyFileError, load_keyring
from cfl_sftp.domain.errors import PolicyError
from cfl_sftp.logs import configure_logging
from cfl_sftp.policy import PolicySnapshot, load_policy_set
from cfl_sftp.policy.reloader import PolicyReloader
from cfl_sftp.runtime import Runtime
from cfl_sftp.sftp.proxy import ProxyProtocolListener
from cfl_sftp.sftp.ssh import LibrarySSHServer
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.vault_admin import NODE_HEARTBEAT_SECONDS, node_stopped, record_node_heartbeat

log = structlog.get_logger(__name__)

CATALOGUE_POLL_SECONDS = 1.0
STAGING_SWEEP_SECONDS = 600.0
CHECKPOINT_SECONDS = 15.0  # SPEC 8 asks for a checkpoint within 60 s of any new entry


def parse_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def node_endpoint(servers: list[asyncssh.SSHAcceptor]) -> str:
    """This node as its successive runs share it: the host name and the addresses it listens on (two live nodes
    cannot bind the same ones), so a restarted node recognises the session rows its previous run left."""
    addresses = sorted(f"{a[0]}:{a[1]}" for server in servers for a in server.get_addresses())
    return f"{socket.gethostname()[:100]} {' '.join(addresses)}"[:255]


@dataclass
class RunningService:
    """A started service: its runtime, its listeners and the ports they are bound to."""

    runtime: Runtime
    servers: list[asyncssh.SSHAcceptor]
    tasks: list[asyncio.Task[None]]
    reload_event: asyncio.Event
    keys_event: asyncio.Event
    node_id: str

    def hangup(self) -> None:
        """``SIGHUP``: re-read the policy set and the key rings now."""
        self.reload_event.set()
        self.keys_event.set()

    @property
    def ports(self) -> list[int]:
        return [s.get_port() for s in self.servers]

    async def stop(self, timeout: float | None = None) -> None:
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout or 5)
        await self.runtime.audit_writer.flush(everything=True)
        await _checkpoint_now(self.runtime.deployment)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(node_stopped, self.runtime.deployment, self.node_id)
        self.runtime.deployment.close()


def load_policy_or_empty(config: Config) -> PolicySnapshot:
    """The policy set at start-up; an invalid set refuses to start (there is no older one to keep)."""
    return load_policy_set(config.policies_dir)


async def _poll_catalogue(runtime: Runtime) -> None:
    """Also the node's first sign of a database outage: a read every second."""
    while True:
        try:
            await asyncio.to_thread(runtime.refresh_catalogue_now)
        except Exception as exc:
            if not runtime.database.failed(exc, "catalogue"):
                log.exception("catalogue_refresh_failed")
        await asyncio.sleep(CATALOGUE_POLL_SECONDS)


async def _watch_policies(runtime: Runtime, config: Config, reload_now: asyncio.Event) -> None:
    """Put each new valid policy set in force (:mod:`cfl_sftp.policy.reloader`); ``SIGHUP`` sets ``reload_now``."""

    def audit(event: str, details: dict[str, object]) -> None:
        runtime.audit_soon(AuditEvent(event, "operator", "", "local", details))

    await PolicyReloader(config.policies_dir, runtime.snapshot, runtime.install_policy, audit).run(reload_now)


async def _sweep_staging(runtime: Runtime) -> None:
    while True:
        try:
            expired = await asyncio.to_thread(runtime.staging.expire)
            if expired:
                log.info("staging_expired", files=expired)
        except Exception as exc:
            if not runtime.database.failed(exc, "staging-expiry"):
                log.exception("staging_sweep_failed")
        await asyncio.sleep(STAGING_SWEEP_SECONDS)


async def _sweep_after_crashes(runtime: Runtime) -> None:
    """Dead processes' scratch folders, orphan files, rows without files (:mod:`cfl_sftp.recovery`)."""
    while True:
        try:
            await asyncio.to_thread(recovery.sweep, runtime.deployment)
        except Exception as exc:
            if not runtime.database.failed(exc, "recovery-sweep"):
                log.exception("recovery_sweep_failed")
        await asyncio.sleep(recovery.SWEEP_SECONDS)


async def _checkpoint_now(
    deployment: Deployment, signer: AuditSigner | None = None, availability: DatabaseAvailability | None = None
) -> None:
    try:
        await asyncio.to_thread(make_checkpoint, deployment, dt.datetime.now(dt.UTC), signer)
    except Exception as exc:
        if availability is None or not availability.failed(exc, "checkpoint"):
            log.exception("checkpoint_failed")


async def _sign_checkpoints(runtime: Runtime, signer: AuditSigner) -> None:
    """Sign the tree whenever it has grown; cheap (one read of the head row) when it has not."""
    while True:
        await _checkpoint_now(runtime.deployment, signer, runtime.database)
        await asyncio.sleep(CHECKPOINT_SECONDS)


async def _keep_node_alive(runtime: Runtime, config: Config, node_id: str, keys_event: asyncio.Event) -> None:
    """Heartbeat with this node's wrapping key id (``vault rotate-key`` waits for every live node to have the
    new ring); on ``SIGHUP`` re-read the key ring first, keeping the old one if the new file is refused."""
    deployment = runtime.deployment
    while True:
        if keys_event.is_set():
            keys_event.clear()
            try:
                deployment.keyring = await asyncio.to_thread(load_keyring, config.vault_key)
                log.info("key_ring_reloaded", wrapping_key=deployment.keyring.wrapping_key_id)
            except KeyFileError as exc:
                log.error("key_ring_refused", reason=str(exc))
        try:
            await asyncio.to_thread(record_node_heartbeat, deployment, node_id)
            runtime.database.succeeded()
        except Exception as exc:
            if not runtime.database.failed(exc, "heartbeat"):
                log.exception("node_heartbeat_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(keys_event.wait(), NODE_HEARTBEAT_SECONDS)


async def start(config: Config, deployment: Deployment | None = None) -> RunningService:
    """Start listening; the caller runs the loop. Used by ``serve``, the demo and the tests."""
    deployment = deployment or Deployment.open(config)
    signer = await asyncio.to_thread(AuditSigner.load, config)  # a bad audit key refuses to start
    await asyncio.to_thread(deployment.db.upgrade_if_empty)
    # Scratch folders are per process: only those of processes that died are cleared (cfl_sftp.recovery).
    deployment.scratch.acquire()  # at once: a node holds its claim for as long as it runs
    await asyncio.to_thread(recovery.sweep_dead_scratch, deployment)
    snapshot = await asyncio.to_thread(load_policy_or_empty, config)
    runtime = Runtime(deployment, snapshot)
    await asyncio.to_thread(runtime.refresh_catalogue_now)
    # Loaded once: given paths, asyncssh would re-read and re-check every host key at each login.
    host_keys = [asyncssh.read_private_key(p) for p in config.host_keys if p.exists()]
    if not host_keys:
        raise FileNotFoundError("no host key found: see host_keys in the configuration")
    servers = []
    # Behind a load balancer each connection starts with its PROXY header (SPEC 9); asyncssh's tunnel hook lets
    # sftp.proxy read it first, so that every peername asyncssh reports is the client's.
    extra: dict[str, object] = {}
    if config.proxy_protocol:
        extra["tunnel"] = ProxyProtocolListener(
            lambda address, reason: runtime.guard.refuse_connection(address, "bad-proxy-header"))
    for address in config.listen:
        host, port = parse_listen(address)
        servers.append(
            await asyncssh.create_server(
                lambda: LibrarySSHServer(runtime),
                host,
                port,
                **extra,
                server_host_keys=host_keys,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
                keepalive_interval=60,
                login_timeout=60,
                # No GSS-API (asyncssh would otherwise also look up this host's FQDN again at every login).
                gss_host=None,
            )
        )
    reload_event = asyncio.Event()
    keys_event = asyncio.Event()
    node_id = deployment.owner_id
    await runtime.guard.start(node_id, node_endpoint(servers))
    tasks = [
        asyncio.create_task(runtime.guard.run()),
        asyncio.create_task(_keep_node_alive(runtime, config, node_id, keys_event)),
        asyncio.create_task(_poll_catalogue(runtime)),
        asyncio.create_task(_watch_policies(runtime, config, reload_event)),
        asyncio.create_task(_sweep_staging(runtime)),
        asyncio.create_task(_sweep_after_crashes(runtime)),
        asyncio.create_task(_sign_checkpoints(runtime, signer)),
        asyncio.create_task(runtime.audit_writer.run()),
    ]
    service = RunningService(runtime, servers, tasks, reload_event, keys_event, node_id)
    log.info("service_started", listen=list(config.listen), ports=service.ports, policy_digest=snapshot.digest,
             node=node_id)
    return service


async def _serve(config: Config) -> None:
    service = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.hangup)
    await stop.wait()
    log.info("service_stopping")
    await service.stop(config.limits.stop_timeout_seconds)
    log.info("service_stopped")


def serve(config: Config) -> int:
    configure_logging()
    try:
        asyncio.run(_serve(config))
    except PolicyError as exc:
        for problem in exc.errors:
            log.error("policy_refused", error=str(problem))
        return 1
    return 0
